use atp_registry::tool;

/// A name with a space.
#[tool(name = "hello world")]
async fn hello_world() -> u8 {
    1
}

/// A param named like the token.
#[tool]
async fn login(auth_token: String) -> String {
    auth_token
}

fn main() {}

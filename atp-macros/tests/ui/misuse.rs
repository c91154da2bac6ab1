use atp_registry::{tool, toolkit};

struct Shop;

impl Shop {
    /// A method without `#[toolkit]` on its impl block.
    #[tool]
    async fn price(&self, item: String) -> u32 {
        item.len() as u32
    }
}

struct Crm;

#[toolkit]
impl Crm {
    /// Finds a company.
    #[tool]
    async fn find(&self, name: String) -> String {
        name
    }

    /// Finds a contact, under the same name.
    #[tool(name = "find")]
    async fn find_contact(&self, name: String) -> String {
        name
    }
}



/// Borrows its argument.
#[tool]
async fn shout(text: &str) -> String {
    text.to_uppercase()
}

/// Wants a token without saying which.
#[tool]
async fn whoami(token: atp_registry::AuthToken) -> usize {
    token.expose().len()
}
fn main() {}

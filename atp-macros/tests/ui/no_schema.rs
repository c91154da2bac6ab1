use atp_registry::tool;

#[derive(serde::Deserialize)]
struct Point {
    x: i64,
    y: i64,
}

/// Draws a point.
#[tool]
async fn draw(at: Point) -> i64 {
    at.x + at.y
}

fn main() {}

//! `ferroclaw`: the operator CLI (see the library).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferroclaw_cli::main_from(std::env::args_os()).await
}

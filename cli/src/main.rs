mod cli;

use clap::Parser;
use cli::{Cli, Cmd, LogFormat};

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(async move {
        match cli.command {
            Cmd::Agent(a) => {
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into());
                let sub = tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr);
                match a.log_format {
                    LogFormat::Json => sub.json().init(),
                    LogFormat::Text => sub.init(),
                }
                let cfg = a.resolve()?;
                if a.print_config {
                    print!("{}", toml::to_string(&cfg)?);
                    return Ok(());
                }
                shoal::agent::run(cfg).await
            }
            Cmd::Whoami { port, udp_port } => {
                shoal_lab::whoami::run(port, udp_port.unwrap_or(port)).await
            }
            Cmd::Lab(l) => cli::run_lab(l).await,
            Cmd::Completion { shell } => {
                use clap::CommandFactory;
                let mut cmd = Cli::command();
                clap_complete::generate(shell, &mut cmd, "shoal", &mut std::io::stdout());
                Ok(())
            }
            Cmd::Version => {
                println!("shoal {}", env!("CARGO_PKG_VERSION"));
                Ok(())
            }
            cmd => cli::run_client(cli.host.as_deref(), cmd).await,
        }
    });
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

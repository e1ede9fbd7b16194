use std::process::ExitCode;

use apikeys::{
    callers,
    config::{CallerTokenCommand, Cli, Command},
    startup::{Application, connect_and_migrate},
};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CallerToken {
        command: CallerTokenCommand::New { name, role },
    }) = &cli.command
    {
        print!("{}", callers::new_token_instructions(name, *role));
        return ExitCode::SUCCESS;
    }
    if let Err(err) = apikeys::telemetry::init(
        cli.settings.log_format,
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    ) {
        eprintln!("cannot set up logging: {err}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => connect_and_migrate(&cli.settings.database_url)
            .await
            .map(|_| {
                tracing::info!("migrations are up to date");
            }),
        Command::CallerToken { .. } => Ok(()),
        Command::Serve => match Application::build(&cli.settings).await {
            Ok(app) => app.run_until_stopped(apikeys::signal::shutdown()).await,
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "apikeys failed");
            ExitCode::FAILURE
        }
    }
}

use std::process::ExitCode;

use apikeys::{
    app::{Application, connect_and_migrate},
    auth,
    cli::{CallerTokenCommand, Cli, Command},
};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command.unwrap_or(Command::Serve) {
        Command::CallerToken {
            command: CallerTokenCommand::New { name, role },
        } => {
            print!("{}", auth::new_token_instructions(&name, role));
            return ExitCode::SUCCESS;
        }
        // The operator CLI is a client: it logs nothing of its own.
        Command::Keys {
            connection,
            command,
        } => return apikeys::cli::run(connection, command).await,
        server => server,
    };
    let telemetry = match apikeys::observability::telemetry::init(
        cli.settings.log_format,
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    ) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("cannot set up logging and tracing: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        Command::Migrate => {
            connect_and_migrate(&cli.settings.database_url, cli.settings.database_pool_size)
                .await
                .map(|_| {
                    tracing::info!("migrations are up to date");
                })
        }
        Command::Serve => match Application::build(&cli.settings).await {
            Ok(app) => {
                app.run_until_stopped(apikeys::app::signal::shutdown())
                    .await
            }
            Err(err) => Err(err),
        },
        Command::CallerToken { .. } | Command::Keys { .. } => Ok(()),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "apikeys failed");
            ExitCode::FAILURE
        }
    };
    // The spans of the last calls leave before the process does (blocking, briefly).
    tokio::task::spawn_blocking(|| telemetry.shutdown())
        .await
        .ok();
    code
}

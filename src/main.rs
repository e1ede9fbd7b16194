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
    let (migrate_only, settings) = match cli.command {
        None => (false, cli.settings),
        Some(Command::Serve(settings)) => (false, *settings),
        Some(Command::Migrate(settings)) => (true, *settings),
        Some(Command::CallerToken {
            command: CallerTokenCommand::New { name, role },
        }) => {
            print!("{}", auth::new_token_instructions(&name, role));
            return ExitCode::SUCCESS;
        }
        // The operator CLI is a client: it logs nothing of its own.
        Some(Command::Keys {
            connection,
            command,
        }) => return apikeys::cli::run(connection, command).await,
    };
    let telemetry = match apikeys::observability::telemetry::init(
        settings.log_format,
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    ) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("cannot set up logging and tracing: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = if migrate_only {
        connect_and_migrate(&settings.database_url, settings.database_pool_size)
            .await
            .map(|_| {
                tracing::info!("migrations are up to date");
            })
    } else {
        match Application::build(&settings).await {
            Ok(app) => {
                app.run_until_stopped(apikeys::app::signal::shutdown())
                    .await
            }
            Err(err) => Err(err),
        }
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

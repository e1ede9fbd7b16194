//! Every log line of every test's server, captured so tests can prove no secret is logged.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use crate::scan::scan_file;

/// Everything any test's server logged, at every level, since the test binary started.
pub(crate) fn captured_logs() -> String {
    let logs = LOGS.get().expect("logs are captured");
    String::from_utf8_lossy(&logs.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// The captured logs, and with the log scan on, their file.
#[derive(Clone)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>, Option<Arc<Mutex<std::fs::File>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        if let Some(file) = &self.1 {
            file.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of every level from our code and the database layer goes to one buffer, so
/// tests can prove no secret is ever logged.
pub(super) fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let file = scan_file("logs").map(|path| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open the log file of the log scan");
            Arc::new(Mutex::new(file))
        });
        let writer = LogBuffer(buffer.clone(), file);
        // RUST_LOG=trace (as .ci/run sets for the log scan) takes every crate's every line.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("trace,h2=debug,hyper=debug,tower=debug,tonic=debug")
        });
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init()
            .ok();
        buffer
    });
}

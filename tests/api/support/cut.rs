//! A proxy that cuts the database off from a server, and restores it.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinHandle;

/// A TCP proxy in front of the test database that a test can cut and restore: the database
/// becomes unreachable (connections reset, new ones refused) without stopping the server
/// other tests share.
#[derive(Debug)]
pub(crate) struct TcpCut {
    pub(crate) url: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl TcpCut {
    /// Proxies the host and port of a `postgres://` URL; `url` is the same URL via the proxy.
    pub(crate) async fn start(database_url: &str) -> Self {
        let after_scheme = database_url.find("://").unwrap() + 3;
        let authority_end = database_url[after_scheme..]
            .find('/')
            .map_or(database_url.len(), |i| after_scheme + i);
        let authority = &database_url[after_scheme..authority_end];
        let host_port = authority.rsplit('@').next().unwrap().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let user = authority
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        let url = format!(
            "{}{user}{proxy}{}",
            &database_url[..after_scheme],
            &database_url[authority_end..]
        );
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = {
            let (cut, links) = (cut.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        continue; // dropped: the client sees a reset
                    }
                    let upstream = host_port.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(link.abort_handle());
                }
            })
        };
        Self {
            url,
            cut,
            links,
            accept,
        }
    }

    /// The database becomes unreachable: open connections drop, new ones are refused.
    pub(crate) fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            link.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpCut {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

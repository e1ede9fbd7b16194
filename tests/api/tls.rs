//! TLS and mutual TLS end to end, with certificates made here (rcgen), and rotation of the
//! server's certificate while it serves.

use std::{path::PathBuf, time::Duration};

use apikeys::{
    auth::{CallerRole, file_line},
    clock::ManualClock,
    grpc::proto::{
        CreateKeyRequest, Expiration, ValidateKeyRequest, ValidationResult,
        api_keys_client::ApiKeysClient,
    },
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::scan::{Recording, caller_token};
use crate::support::{TestApp, TestDb, as_owner, spawn_app_with};

/// A certificate authority that signs server and client certificates.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) pem: String,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `dns_name` with the given use, and its key, both PEM.
    pub(crate) fn sign(&self, dns_name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(vec![dns_name.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The server's TLS files in a temporary directory.
pub(crate) struct TlsDir {
    dir: tempfile::TempDir,
}

impl TlsDir {
    pub(crate) fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the server certificate (for `localhost`, signed by `ca`) and its key.
    pub(crate) fn write_server(&self, ca: &Ca) {
        let (cert, key) = ca.sign("localhost", ExtendedKeyUsagePurpose::ServerAuth);
        std::fs::write(self.path("server.pem"), cert).unwrap();
        std::fs::write(self.path("server.key"), key).unwrap();
    }
}

async fn spawn_tls(tls: &TlsDir, client_ca: Option<&Ca>, callers: Option<String>) -> TestApp {
    if let Some(ca) = client_ca {
        std::fs::write(tls.path("clients.pem"), &ca.pem).unwrap();
    }
    if let Some(callers) = &callers {
        std::fs::write(tls.path("callers"), callers).unwrap();
    }
    spawn_app_with(
        TestDb::new().await,
        ManualClock::new(chrono::Utc::now()),
        |settings| {
            settings.tls_cert = Some(tls.path("server.pem"));
            settings.tls_key = Some(tls.path("server.key"));
            settings.tls_client_ca = client_ca.map(|_| tls.path("clients.pem"));
            settings.callers_file = callers.map(|_| tls.path("callers"));
            settings.tls_reload_interval = Duration::from_millis(100);
        },
    )
    .await
}

/// A client that trusts `ca` for the server, presenting `identity` if given.
async fn connect(
    app: &TestApp,
    ca: &Ca,
    identity: Option<(String, String)>,
) -> Result<ApiKeysClient<Recording>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(ApiKeysClient::new(Recording(channel)))
}

async fn validate(
    client: &mut ApiKeysClient<Recording>,
) -> Result<ValidationResult, tonic::Status> {
    client
        .validate_key(ValidateKeyRequest {
            key: "clo_x".into(),
            ..Default::default()
        })
        .await
        .map(|response| response.into_inner().result())
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_refuses_plaintext() {
    let (ca, tls) = (Ca::new("server ca"), TlsDir::new());
    tls.write_server(&ca);
    let mut app = spawn_tls(&tls, None, None).await;

    let mut client = connect(&app, &ca, None).await.expect("TLS connects");
    let other_ca = connect(&app, &Ca::new("someone else"), None).await;
    let plaintext = validate(&mut app.client).await;

    assert_eq!(
        validate(&mut client).await.unwrap(),
        ValidationResult::Malformed
    );
    assert!(
        other_ca.is_err(),
        "a client that does not trust the CA must fail"
    );
    assert!(plaintext.is_err(), "plaintext must not be served");
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let (server_ca, client_ca, tls) = (Ca::new("server ca"), Ca::new("client ca"), TlsDir::new());
    tls.write_server(&server_ca);
    let app = spawn_tls(&tls, Some(&client_ca), None).await;
    let good = client_ca.sign("gw.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let forged = Ca::new("client ca").sign("gw.internal", ExtendedKeyUsagePurpose::ClientAuth);

    let mut with_cert = connect(&app, &server_ca, Some(good)).await.unwrap();
    let anonymous = match connect(&app, &server_ca, None).await {
        Ok(mut client) => validate(&mut client).await.map(drop),
        Err(err) => Err(tonic::Status::unavailable(err.to_string())),
    };
    let forged = match connect(&app, &server_ca, Some(forged)).await {
        Ok(mut client) => validate(&mut client).await.map(drop),
        Err(err) => Err(tonic::Status::unavailable(err.to_string())),
    };

    assert_eq!(
        validate(&mut with_cert).await.unwrap(),
        ValidationResult::Malformed
    );
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    assert!(forged.is_err(), "a certificate from another CA: {forged:?}");
}

#[tokio::test]
async fn with_mutual_tls_a_caller_is_known_by_its_certificate_name() {
    let (server_ca, client_ca, tls) = (Ca::new("server ca"), Ca::new("client ca"), TlsDir::new());
    tls.write_server(&server_ca);
    let admin = caller_token();
    let callers = format!(
        "edge-gateway gateway san:gw.internal\n{}\n",
        file_line("billing-admin", CallerRole::Admin, &admin)
    );
    let app = spawn_tls(&tls, Some(&client_ca), Some(callers)).await;
    let gateway_cert = client_ca.sign("gw.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let stranger_cert = client_ca.sign("stranger.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let mut gateway = connect(&app, &server_ca, Some(gateway_cert)).await.unwrap();
    let mut stranger = connect(&app, &server_ca, Some(stranger_cert.clone()))
        .await
        .unwrap();
    let mut admin_client = connect(&app, &server_ca, Some(stranger_cert))
        .await
        .unwrap();
    let create = || {
        as_owner(CreateKeyRequest {
            workspace_id: "acme".into(),
            name: "k".into(),
            expiration: Expiration::Never.into(),
            ..Default::default()
        })
    };

    let validated = validate(&mut gateway).await;
    let gateway_create = gateway.create_key(create()).await.unwrap_err();
    let stranger_validate = validate(&mut stranger).await.unwrap_err();
    let mut by_token = create();
    by_token.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", admin.expose()).parse().unwrap(),
    );
    let admin_create = admin_client.create_key(by_token).await;

    assert_eq!(validated.unwrap(), ValidationResult::Malformed);
    assert_eq!(gateway_create.code(), Code::PermissionDenied);
    assert_eq!(stranger_validate.code(), Code::Unauthenticated);
    assert!(
        admin_create.is_ok(),
        "a token works over mTLS too: {admin_create:?}"
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart_or_a_dropped_connection() {
    let (old_ca, new_ca, tls) = (Ca::new("old ca"), Ca::new("new ca"), TlsDir::new());
    tls.write_server(&old_ca);
    let app = spawn_tls(&tls, None, None).await;
    let mut established = connect(&app, &old_ca, None).await.unwrap();
    assert!(validate(&mut established).await.is_ok());

    tls.write_server(&new_ca);

    // The file watch picks the new certificate up for new connections.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut fresh = loop {
        match connect(&app, &new_ca, None).await {
            Ok(client) => break client,
            Err(err) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the new certificate was not served: {err}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(validate(&mut fresh).await.is_ok());
    assert!(
        connect(&app, &old_ca, None).await.is_err(),
        "new connections get the new certificate"
    );
    assert!(
        validate(&mut established).await.is_ok(),
        "a connection made before the rotation keeps working"
    );
}

#[tokio::test]
async fn a_broken_certificate_file_is_not_loaded_and_the_old_one_stays() {
    let (ca, tls) = (Ca::new("server ca"), TlsDir::new());
    tls.write_server(&ca);
    let app = spawn_tls(&tls, None, None).await;

    std::fs::write(tls.path("server.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let mut client = connect(&app, &ca, None)
        .await
        .expect("still serving the last good certificate");
    assert!(validate(&mut client).await.is_ok());
}

#[cfg(unix)]
#[tokio::test]
async fn a_private_key_others_may_write_stops_the_start_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let (ca, tls) = (Ca::new("server ca"), TlsDir::new());
    tls.write_server(&ca);
    let key = tls.path("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o666)).unwrap();
    let db = TestDb::new().await;
    let mut settings =
        apikeys::config::Settings::new("127.0.0.1:0".parse().unwrap(), db.url.clone());
    settings.tls_cert = Some(tls.path("server.pem"));
    settings.tls_key = Some(key.clone());

    let err = apikeys::app::Application::build(&settings)
        .await
        .unwrap_err()
        .to_string();

    let fix = format!("chmod go-w {}", key.display());
    assert!(err.contains(&fix), "{err:?} should say {fix:?}");
}

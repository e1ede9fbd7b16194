//! The deployment files agree with the binary: every `APIKEYS_*` variable they set is one the
//! binary reads, the probes ask health names the server reports on the port it listens on,
//! and the image exposes that port. (CI also checks the files against the Kubernetes and
//! compose schemas.)

use std::{collections::BTreeSet, path::Path, process::Command};

use apikeys::app::{LIVENESS_NAME, SERVICE_NAME};

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Every `APIKEYS_…` name in `text`.
fn variables(text: &str) -> BTreeSet<String> {
    text.match_indices("APIKEYS_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// The value after `key:` on the line after the one naming `name` (`- name: X` / `value: Y`).
fn env_value(manifest: &str, name: &str) -> String {
    let mut lines = manifest.lines();
    lines
        .find(|line| line.trim() == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("{name} is not set"));
    let value = lines.next().unwrap().trim();
    value
        .strip_prefix("value:")
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_owned()
}

#[test]
fn deployment_files_use_only_variables_the_binary_reads() {
    let mut help = String::new();
    for args in [&["--help"][..], &["keys", "--help"][..]] {
        let output = Command::new(env!("CARGO_BIN_EXE_apikeys"))
            .args(args)
            .output()
            .unwrap();
        help.push_str(&String::from_utf8(output.stdout).unwrap());
    }
    let known = variables(&help);
    assert!(known.contains("APIKEYS_LISTEN") && known.contains("APIKEYS_METRICS_LISTEN"));
    for file in [
        "deploy/Dockerfile",
        "deploy/compose.yaml",
        "deploy/kubernetes/deployment.yaml",
    ] {
        let used = variables(&read(file));
        assert!(!used.is_empty(), "{file}");
        let unknown: Vec<_> = used.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{file} sets {unknown:?}, which apikeys does not read"
        );
    }
}

#[test]
fn probes_and_ports_match_what_the_server_serves() {
    let manifest = read("deploy/kubernetes/deployment.yaml");
    let listen = env_value(&manifest, "APIKEYS_LISTEN");
    let port = listen.rsplit(':').next().unwrap();
    let metrics = env_value(&manifest, "APIKEYS_METRICS_LISTEN");
    let metrics_port = metrics.rsplit(':').next().unwrap();
    assert!(manifest.contains(&format!("containerPort: {port}")));
    assert!(manifest.contains(&format!("containerPort: {metrics_port}")));

    // Each probe is a native gRPC probe on the gRPC port, asking a name health reports on.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let section: Vec<&str> = manifest
            .lines()
            .skip_while(|line| line.trim() != format!("{probe}:"))
            .skip(1)
            .take(4)
            .collect();
        assert_eq!(section.first().map(|l| l.trim()), Some("grpc:"), "{probe}");
        assert!(
            section.contains(&format!("              port: {port}").as_str()),
            "{probe}: {section:?}"
        );
        let service = section
            .iter()
            .find_map(|line| line.trim().strip_prefix("service: "))
            .unwrap_or_else(|| panic!("{probe} names no service"));
        let expected = if probe == "readinessProbe" {
            SERVICE_NAME
        } else {
            LIVENESS_NAME
        };
        assert_eq!(service, expected, "{probe}");
    }

    let dockerfile = read("deploy/Dockerfile");
    let expose = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("EXPOSE "))
        .unwrap();
    assert!(expose.split_whitespace().any(|p| p == port));
    assert!(expose.split_whitespace().any(|p| p == metrics_port));
    assert!(dockerfile.contains(&format!("APIKEYS_LISTEN=0.0.0.0:{port}")));

    let service = read("deploy/kubernetes/service.yaml");
    assert!(service.contains(&format!("port: {port}")));
}

#[test]
fn the_envoy_example_asks_this_service_on_its_port_and_fails_closed() {
    let envoy = read("deploy/envoy/envoy.yaml");
    let defaults = apikeys::config::Settings::new("127.0.0.1:50051".parse().unwrap(), "");
    for needle in [
        "name: envoy.filters.http.ext_authz",
        "transport_api_version: V3",
        "failure_mode_allow: false",
        "cluster_name: apikeys",
        "http2_protocol_options: {}",
        "port_value: 50051",
        &format!("service_name: {SERVICE_NAME}"),
    ] {
        assert!(envoy.contains(needle), "envoy.yaml lacks `{needle}`");
    }
    // Envoy forwards exactly the headers the service reads the key from.
    for header in &defaults.gateway_key_headers {
        assert!(
            envoy.contains(&format!("- exact: {header}")),
            "envoy.yaml does not forward {header}"
        );
    }
    // The per-route scopes are scopes the service accepts.
    let scopes: Vec<&str> = envoy
        .lines()
        .filter_map(|line| line.trim().strip_prefix("required_scopes:"))
        .collect();
    assert!(!scopes.is_empty());
    for list in scopes {
        for scope in list.trim().trim_matches('"').split(',') {
            assert!(apikeys::domain::is_scope(scope.trim()), "{scope}");
        }
    }

    let istio = read("deploy/envoy/istio.yaml");
    for needle in [
        "envoyExtAuthzGrpc:",
        "port: 50051",
        "failOpen: false",
        "action: CUSTOM",
        "name: cloodot-apikeys",
    ] {
        assert!(istio.contains(needle), "istio.yaml lacks `{needle}`");
    }
}

#[test]
fn the_manifests_run_this_release_migrate_first_and_spread_across_zones() {
    let manifest = read("deploy/kubernetes/deployment.yaml");
    let images: Vec<&str> = manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image: "))
        .collect();
    let release = format!("ghcr.io/cloodot/apikeys:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        images,
        [release.as_str(), release.as_str()],
        "one pinned tag, never latest"
    );

    // The init container migrates with a subcommand the binary has.
    let init: Vec<&str> = manifest
        .lines()
        .skip_while(|line| line.trim() != "initContainers:")
        .take_while(|line| line.trim() != "containers:")
        .collect();
    assert!(
        init.iter()
            .any(|line| line.trim() == r#"args: ["migrate"]"#),
        "{init:?}"
    );
    let help = Command::new(env!("CARGO_BIN_EXE_apikeys"))
        .args(["migrate", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());

    for key in ["topology.kubernetes.io/zone", "kubernetes.io/hostname"] {
        assert!(
            manifest.contains(&format!("topologyKey: {key}")),
            "no spread by {key}"
        );
    }
    // The autoscaler owns the replica count.
    assert!(!manifest.contains("\n  replicas:"));
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    for file in ["hpa.yaml", "networkpolicy.yaml", "pdb.yaml"] {
        assert!(kustomization.contains(file), "{file} is not applied");
    }
    // The network policy opens the ports the pods serve on, by their names.
    let policy = read("deploy/kubernetes/networkpolicy.yaml");
    for port in ["grpc", "metrics"] {
        assert!(manifest.contains(&format!("- name: {port}\n")));
        assert!(policy.contains(&format!("- port: {port}\n")), "{port}");
    }
}

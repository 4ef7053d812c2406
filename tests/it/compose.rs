//! docker-compose.yml, the Dockerfile and rabbitmq/ cannot run here (no Docker engine), so this
//! checks what can be checked: the compose file parses, and every service, port, variable, file
//! and binary it names matches the code, the config and each other.

use std::collections::BTreeMap;
use std::path::Path;

use ipn_bridge::config::Config;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
    volumes: BTreeMap<String, Option<serde::de::IgnoredAny>>,
}

#[derive(Debug, Deserialize)]
struct Service {
    image: Option<String>,
    build: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    expose: Vec<String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    profiles: Vec<String>,
}

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Compose {
    serde_saphyr::from_str(&repo_file("docker-compose.yml")).expect("docker-compose.yml parses")
}

/// `${NAME:-default}` as compose resolves it with NAME unset.
fn resolved(value: &str) -> String {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(inner) => inner
            .split_once(":-")
            .map(|(_, d)| d)
            .unwrap_or("")
            .to_owned(),
        None => value.to_owned(),
    }
}

/// The config a service's binary would load: config/compose.toml plus its IPN_* variables.
fn config_of(service: &Service) -> Config {
    let env: BTreeMap<String, String> = service
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), resolved(v)))
        .collect();
    assert_eq!(env["IPN_CONFIG"], "/etc/ipn-bridge/config.toml");
    assert!(
        service
            .volumes
            .contains(&"./config/compose.toml:/etc/ipn-bridge/config.toml:ro".to_owned())
    );
    Config::load(Some(&repo_file("config/compose.toml")), &env)
        .unwrap_or_else(|e| panic!("a variable compose sets is not a valid setting: {e}"))
}

fn port(address: &str) -> String {
    address.rsplit(':').next().expect("a port").to_owned()
}

fn conf_value(conf: &str, key: &str) -> String {
    conf.lines()
        .find_map(|line| line.strip_prefix(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("rabbitmq.conf sets {key}"))
        .trim()
        .to_owned()
}

#[test]
fn the_compose_file_names_what_the_code_and_the_config_define() {
    let compose = compose();
    let names: Vec<&str> = compose.services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["fake-paypal", "ingress", "postgres", "rabbitmq", "worker"]
    );
    assert_eq!(
        compose.volumes.keys().collect::<Vec<_>>(),
        ["postgres-data", "rabbitmq-data"]
    );

    let binaries: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin"))
            .expect("src/bin")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
    let dockerfile = repo_file("Dockerfile");
    for binary in &binaries {
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "the image has {binary}"
        );
    }
    for name in ["ingress", "worker", "fake-paypal"] {
        let service = &compose.services[name];
        assert_eq!(
            service.build.as_deref(),
            Some("."),
            "{name} is built from the Dockerfile"
        );
        let command = service.command.as_ref().expect("command");
        assert!(
            binaries.contains(&command[0]),
            "{name} runs one of our binaries: {command:?}"
        );
        config_of(service);
    }

    let ingress = config_of(&compose.services["ingress"]);
    let published: Vec<String> = compose.services["ingress"]
        .ports
        .iter()
        .map(|p| port(p))
        .collect();
    assert_eq!(published, [ingress.ingress.listen.port().to_string()]);
    assert_eq!(ingress.ingress.path, "/ipn");

    let worker = config_of(&compose.services["worker"]);
    assert_eq!(
        compose.services["worker"].expose,
        [worker.worker.listen.port().to_string()]
    );
    assert!(
        compose.services["worker"].ports.is_empty(),
        "--scale needs no published port"
    );
    assert_eq!(
        worker.paypal.verify_url, None,
        "live PayPal unless told otherwise"
    );
    assert!(worker.downstream.iter().any(|d| d.queue == "demo.events"));

    // The demo's fake PayPal listens where the compose file's comment points the worker.
    let fake = &compose.services["fake-paypal"];
    assert_eq!(fake.profiles, ["demo"]);
    let command = fake.command.as_ref().expect("command");
    let listen = &command[command
        .iter()
        .position(|a| a == "--listen")
        .expect("--listen")
        + 1];
    assert_eq!(fake.expose, [port(listen)]);
    let demo_url = format!("http://fake-paypal:{}/cgi-bin/webscr", port(listen));
    assert!(
        repo_file("docker-compose.yml").contains(&demo_url),
        "{demo_url}"
    );
    assert!(
        repo_file("README.md").contains(&demo_url),
        "the README shows the demo"
    );
}

#[test]
fn the_broker_and_database_settings_agree_with_the_urls_the_binaries_use() {
    let compose = compose();
    let rabbitmq = &compose.services["rabbitmq"];
    let image = rabbitmq.image.as_deref().expect("image");
    assert!(
        image.starts_with("rabbitmq:4.") && image.ends_with("-management"),
        "{image}"
    );
    for mount in &rabbitmq.volumes {
        if let Some(host) = mount.strip_prefix("./").and_then(|m| m.split(':').next()) {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(host).exists(),
                "{host}"
            );
        }
    }
    let ports: Vec<String> = rabbitmq
        .ports
        .iter()
        .map(|p| {
            p.split(':')
                .next()
                .unwrap_or("")
                .trim_matches('"')
                .to_owned()
        })
        .collect();
    assert_eq!(ports, ["5672", "15672", "15692"]);
    let plugins = repo_file("rabbitmq/enabled_plugins");
    assert!(plugins.contains("rabbitmq_management") && plugins.contains("rabbitmq_prometheus"));

    let conf = repo_file("rabbitmq/rabbitmq.conf");
    let (user, pass) = (
        conf_value(&conf, "default_user"),
        conf_value(&conf, "default_pass"),
    );
    let amqp = &compose.services["ingress"].environment["IPN_AMQP__URL"];
    assert_eq!(amqp, &format!("amqp://{user}:{pass}@rabbitmq:5672/%2f"));
    assert_eq!(
        &compose.services["worker"].environment["IPN_AMQP__URL"],
        amqp
    );

    // The consumer timeout outlasts the worker's longest hold of a delivery with the defaults:
    // every in-process postback timing out, with the backoff between them.
    let timeout_ms: u128 = conf_value(&conf, "consumer_timeout")
        .parse()
        .expect("number");
    let defaults = Config::default();
    let attempts = defaults.worker.verify_attempts.get();
    let backoff: u128 = (0..attempts.saturating_sub(1))
        .map(|n| defaults.worker.verify_backoff.as_millis() << n)
        .sum();
    let hold = defaults.paypal.verify_timeout.as_millis() * u128::from(attempts) + backoff;
    assert!(
        timeout_ms > 10 * hold,
        "consumer_timeout {timeout_ms} ms vs {hold} ms"
    );

    let postgres = &compose.services["postgres"];
    assert_eq!(postgres.image.as_deref(), Some("postgres:15"));
    let password = &postgres.environment["POSTGRES_PASSWORD"];
    let database = &postgres.environment["POSTGRES_DB"];
    assert_eq!(
        compose.services["worker"].environment["IPN_DATABASE__URL"],
        format!("postgres://postgres:{password}@postgres:5432/{database}")
    );
}

#[test]
fn the_image_runs_as_an_unprivileged_user_and_builds_with_our_toolchain() {
    let dockerfile = repo_file("Dockerfile");
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "{user}"
    );
    let manifest = repo_file("Cargo.toml");
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"');
    let builder = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("FROM rust");
    let image_version = builder.split('-').next().expect("version");
    let parse =
        |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().expect("number")).collect() };
    assert!(
        parse(image_version) >= parse(rust_version),
        "{image_version} < {rust_version}"
    );
    assert!(repo_file(".dockerignore").lines().any(|l| l == "target"));
}

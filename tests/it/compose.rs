//! docker-compose.yml, the Dockerfile and rabbitmq/ cannot run here (no Docker engine), so this
//! checks what can be checked: the Compose CLI itself (`docker-compose config`, from
//! `scripts/tools`) reads the file as Docker would, with `.env.example`, and every service, port,
//! variable, file and binary it resolves to matches the code, the config and each other.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ipn_bridge::config::{Config, LogFormat};
use serde::Deserialize;

/// The project as `docker-compose config --format json` resolves it.
#[derive(Debug, Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
    volumes: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Service {
    image: Option<String>,
    build: Option<Build>,
    command: Option<Vec<String>>,
    hostname: Option<String>,
    #[serde(default)]
    environment: BTreeMap<String, Option<String>>,
    #[serde(default)]
    ports: Vec<Port>,
    #[serde(default)]
    expose: Vec<String>,
    #[serde(default)]
    volumes: Vec<Mount>,
    #[serde(default)]
    profiles: Vec<String>,
    stop_grace_period: Option<String>,
    healthcheck: Option<Healthcheck>,
}

#[derive(Debug, Deserialize)]
struct Build {
    context: String,
    dockerfile: String,
}

#[derive(Debug, Deserialize)]
struct Port {
    host_ip: Option<String>,
    published: String,
    target: u16,
}

#[derive(Debug, Deserialize)]
struct Mount {
    source: String,
    target: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Debug, Deserialize)]
struct Healthcheck {
    test: Vec<String>,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn repo_file(path: &str) -> String {
    let full = repo().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `docker-compose` from `scripts/tools` (the README's test command runs it first).
fn compose_cli() -> Command {
    let cli = repo().join("target/tools/bin/docker-compose");
    assert!(
        cli.exists(),
        "{} is missing: run scripts/tools (scripts/test does)",
        cli.display()
    );
    let mut command = Command::new(cli);
    command.current_dir(repo());
    // Only the env file given decides the interpolation, not this shell's variables.
    for name in [
        "RABBITMQ_USER",
        "RABBITMQ_PASSWORD",
        "POSTGRES_PASSWORD",
        "IPN_PAYPAL__ENVIRONMENT",
        "IPN_PAYPAL__VERIFY_URL",
        "IPN_PAYPAL__RECEIVER_EMAILS",
        "COMPOSE_PROFILES",
        "COMPOSE_FILE",
    ] {
        command.env_remove(name);
    }
    command
}

/// The project with `.env.example` and every profile, as the Compose CLI resolves it.
fn compose() -> Compose {
    let output = compose_cli()
        .args([
            "--env-file",
            ".env.example",
            "--profile",
            "demo",
            "config",
            "--format",
            "json",
        ])
        .output()
        .expect("docker-compose runs");
    assert!(
        output.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("docker-compose config prints the project")
}

fn env<'a>(service: &'a Service, name: &str) -> &'a str {
    service
        .environment
        .get(name)
        .and_then(Option::as_deref)
        .unwrap_or_else(|| panic!("{name} is set"))
}

/// The config a service's binary would load: config/compose.toml plus its IPN_* variables.
fn config_of(service: &Service) -> Config {
    let env: BTreeMap<String, String> = service
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env["IPN_CONFIG"], "/etc/ipn-bridge/config.toml");
    let mounted = service.volumes.iter().any(|m| {
        Path::new(&m.source) == repo().join("config/compose.toml")
            && m.target == "/etc/ipn-bridge/config.toml"
            && m.read_only
    });
    assert!(mounted, "config/compose.toml is mounted read-only");
    Config::load(Some(&repo_file("config/compose.toml")), &env)
        .unwrap_or_else(|e| panic!("a variable compose sets is not a valid setting: {e}"))
}

fn port(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

fn conf_value(conf: &str, key: &str) -> Option<String> {
    conf.lines()
        .find_map(|line| line.strip_prefix(&format!("{key} = ")))
        .map(|value| value.trim().to_owned())
}

fn grace(service: &Service) -> Duration {
    let text = service
        .stop_grace_period
        .as_deref()
        .expect("stop_grace_period is set");
    humantime::parse_duration(text).expect("a duration")
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

    let binaries: Vec<String> = std::fs::read_dir(repo().join("src/bin"))
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
        let build = service.build.as_ref().expect("built here");
        assert_eq!(
            Path::new(&build.context),
            repo(),
            "{name} is built from the repo"
        );
        assert_eq!(build.dockerfile, "Dockerfile");
        let command = service.command.as_ref().expect("command");
        assert!(
            binaries.contains(&command[0]),
            "{name} runs one of our binaries: {command:?}"
        );
        let config = config_of(service);
        // Container logs are JSON lines, not the pretty format with ANSI escapes.
        assert_eq!(config.telemetry.format, LogFormat::Json, "{name}");
    }

    let ingress = config_of(&compose.services["ingress"]);
    let published = &compose.services["ingress"].ports;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].target, ingress.ingress.listen.port());
    assert_eq!(
        published[0].published,
        ingress.ingress.listen.port().to_string()
    );
    assert_eq!(ingress.ingress.path, "/ipn");
    // Its metrics on a port of their own, reachable on the stack's network, not published.
    let admin = ingress.ingress.admin_listen.expect("an admin listener");
    assert_eq!(
        compose.services["ingress"].expose,
        [admin.port().to_string()]
    );

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
    assert_eq!(fake.expose, [port(listen).to_string()]);
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
fn only_the_ingress_is_reachable_from_outside_and_both_binaries_have_a_healthcheck_and_their_grace()
{
    let compose = compose();
    for (name, service) in &compose.services {
        for port in &service.ports {
            if name == "ingress" {
                continue;
            }
            assert_eq!(
                port.host_ip.as_deref(),
                Some("127.0.0.1"),
                "{name} publishes {} on the host's loopback only",
                port.published
            );
        }
    }
    let ingress = config_of(&compose.services["ingress"]);
    let worker = config_of(&compose.services["worker"]);
    for (name, listen, shutdown_grace) in [
        (
            "ingress",
            ingress.ingress.listen,
            ingress.ingress.shutdown_grace,
        ),
        ("worker", worker.worker.listen, worker.worker.shutdown_grace),
    ] {
        let service = &compose.services[name];
        let test = &service.healthcheck.as_ref().expect("a healthcheck").test;
        let probe = format!("http://127.0.0.1:{}/readyz", listen.port());
        assert_eq!(test, &["CMD", "ipnctl", "health", probe.as_str()], "{name}");
        // Docker sends SIGKILL after stop_grace_period: the binary's drain must fit in it.
        assert!(
            grace(service) > shutdown_grace,
            "{name}: stop_grace_period {:?} vs shutdown grace {shutdown_grace:?}",
            grace(service)
        );
    }
}

#[test]
fn the_compose_file_refuses_to_start_without_the_passwords_of_the_env_file() {
    let output = compose_cli()
        .args(["--env-file", "/dev/null", "config", "--quiet"])
        .output()
        .expect("docker-compose runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for name in ["RABBITMQ_PASSWORD", "POSTGRES_PASSWORD"] {
        assert!(stderr.contains(name), "{stderr}");
    }
    assert!(stderr.contains("cp .env.example .env"), "{stderr}");
    // No password in the files that are committed.
    let conf = repo_file("rabbitmq/rabbitmq.conf");
    assert_eq!(conf_value(&conf, "default_pass"), None);
    assert!(repo_file(".gitignore").lines().any(|l| l == ".env"));
    assert!(repo_file(".dockerignore").lines().any(|l| l == ".env"));
}

#[test]
fn the_broker_keeps_its_node_name_and_the_settings_agree_with_the_urls_the_binaries_use() {
    let compose = compose();
    let rabbitmq = &compose.services["rabbitmq"];
    let image = rabbitmq.image.as_deref().expect("image");
    // 4.2: the RabbitMQ line in community support (4.1 left it on 2026-01-30).
    assert_eq!(image, "rabbitmq:4.2-management");
    // The image keeps its data under the node name, which defaults to the container's
    // hostname: both fixed, so a new container finds the old node's queues.
    let hostname = rabbitmq.hostname.as_deref().expect("a fixed hostname");
    assert_eq!(
        env(rabbitmq, "RABBITMQ_NODENAME"),
        format!("rabbit@{hostname}")
    );
    assert!(
        rabbitmq
            .volumes
            .iter()
            .any(|m| m.source == "rabbitmq-data" && m.target == "/var/lib/rabbitmq"),
        "the node's data is on the named volume"
    );
    for mount in &rabbitmq.volumes {
        if mount.source.starts_with('/') {
            assert!(Path::new(&mount.source).exists(), "{}", mount.source);
        }
    }
    let ports: Vec<u16> = rabbitmq.ports.iter().map(|p| p.target).collect();
    assert_eq!(ports, [5672, 15672, 15692]);
    let plugins = repo_file("rabbitmq/enabled_plugins");
    assert!(plugins.contains("rabbitmq_management") && plugins.contains("rabbitmq_prometheus"));

    let (user, pass) = (
        env(rabbitmq, "RABBITMQ_DEFAULT_USER"),
        env(rabbitmq, "RABBITMQ_DEFAULT_PASS"),
    );
    let amqp = env(&compose.services["ingress"], "IPN_AMQP__URL");
    assert_eq!(amqp, format!("amqp://{user}:{pass}@{hostname}:5672/%2f"));
    assert_eq!(env(&compose.services["worker"], "IPN_AMQP__URL"), amqp);

    // The consumer timeout outlasts the worker's longest hold of a delivery with the defaults:
    // every in-process postback timing out, with the backoff between them.
    let conf = repo_file("rabbitmq/rabbitmq.conf");
    let timeout_ms: u128 = conf_value(&conf, "consumer_timeout")
        .expect("consumer_timeout is set")
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
    let password = env(postgres, "POSTGRES_PASSWORD");
    let database = env(postgres, "POSTGRES_DB");
    assert_eq!(
        env(&compose.services["worker"], "IPN_DATABASE__URL"),
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
    // Dependencies compile once: the registry and the target directory are cache mounts.
    for cache in ["/usr/local/cargo/registry", "/src/target"] {
        assert!(
            dockerfile.contains(&format!("--mount=type=cache,target={cache}")),
            "{cache}"
        );
    }
}

//! deploy/kubernetes/ipn-bridge.yaml cannot run here (no cluster): this loads each binary's
//! config exactly as its Deployment would give it (the ConfigMap's file, the container's `env`,
//! the Secret's `envFrom`, and the variables Kubernetes injects for every Service of the
//! namespace, a Service named `ipn` included), and checks probes, ports and grace periods
//! against that config.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ipn_bridge::config::Config;
use serde_json::Value;

fn manifest() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/ipn-bridge.yaml");
    let text = std::fs::read_to_string(&path).expect("the manifest");
    serde_saphyr::from_multiple(&text).expect("the manifest is YAML")
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name}"))
}

/// What Kubernetes puts in every pod's environment for `service` (with service links on):
/// `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT NAME>]`, `<NAME>_PORT` and
/// `<NAME>_PORT_<port>_TCP[_PROTO|_PORT|_ADDR]`.
fn service_links(name: &str, ports: &[(Option<&str>, u64)]) -> Vec<(String, String)> {
    let prefix = name.to_uppercase().replace('-', "_");
    let host = "10.96.0.17";
    let mut env = vec![(format!("{prefix}_SERVICE_HOST"), host.to_owned())];
    for (index, (port_name, port)) in ports.iter().enumerate() {
        if index == 0 {
            env.push((format!("{prefix}_SERVICE_PORT"), port.to_string()));
            env.push((format!("{prefix}_PORT"), format!("tcp://{host}:{port}")));
        }
        if let Some(port_name) = port_name {
            let port_name = port_name.to_uppercase().replace('-', "_");
            env.push((
                format!("{prefix}_SERVICE_PORT_{port_name}"),
                port.to_string(),
            ));
        }
        let tcp = format!("{prefix}_PORT_{port}_TCP");
        env.push((tcp.clone(), format!("tcp://{host}:{port}")));
        env.push((format!("{tcp}_PROTO"), "tcp".to_owned()));
        env.push((format!("{tcp}_PORT"), port.to_string()));
        env.push((format!("{tcp}_ADDR"), host.to_owned()));
    }
    env
}

/// The environment the Deployment's first container starts with.
fn environment(docs: &[Value], deployment: &Value) -> BTreeMap<String, String> {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut env = BTreeMap::new();
    for service in of_kind(docs, "Service") {
        let ports: Vec<(Option<&str>, u64)> = service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| (p["name"].as_str(), p["port"].as_u64().expect("port")))
            .collect();
        let name = service["metadata"]["name"].as_str().expect("name");
        env.extend(service_links(name, &ports));
    }
    // The case: a Service named `ipn` in the namespace.
    env.extend(service_links("ipn", &[(Some("http"), 80)]));
    for from in container["envFrom"].as_array().expect("envFrom") {
        let secret = named(
            docs,
            "Secret",
            from["secretRef"]["name"].as_str().expect("secret"),
        );
        for (name, value) in secret["stringData"].as_object().expect("stringData") {
            env.insert(name.clone(), value.as_str().expect("text").to_owned());
        }
    }
    for variable in container["env"].as_array().expect("env") {
        let (name, value) = (variable["name"].as_str(), variable["value"].as_str());
        env.insert(
            name.expect("name").to_owned(),
            value.expect("value").to_owned(),
        );
    }
    env
}

/// The config the Deployment's binary loads.
fn config_of(docs: &[Value], deployment: &Value) -> Config {
    let env = environment(docs, deployment);
    let spec = &deployment["spec"]["template"]["spec"];
    let mount = &spec["containers"][0]["volumeMounts"][0];
    let file = format!("{}/config.toml", mount["mountPath"].as_str().expect("path"));
    assert_eq!(env["IPN_CONFIG"], file);
    let volume = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let map = named(
        docs,
        "ConfigMap",
        volume["configMap"]["name"].as_str().expect("map"),
    );
    let toml = map["data"]["config.toml"].as_str().expect("config.toml");
    Config::load(Some(toml), &env).unwrap_or_else(|e| panic!("the pod's config does not load: {e}"))
}

fn seconds(value: &Value) -> Duration {
    Duration::from_secs(value.as_u64().expect("seconds"))
}

#[test]
fn each_deployment_loads_its_config_with_every_variable_kubernetes_injects() {
    let docs = manifest();
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 2);
    for deployment in deployments {
        let name = deployment["metadata"]["name"].as_str().expect("name");
        let spec = &deployment["spec"]["template"]["spec"];
        let container = &spec["containers"][0];
        let binary = container["command"][0].as_str().expect("command");
        assert_eq!(binary, name, "{name} runs its binary");
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("src/bin/{binary}.rs"))
                .exists()
        );
        let config = config_of(&docs, deployment);
        assert_eq!(config.telemetry.format, ipn_bridge::config::LogFormat::Json);
        let (listen, shutdown_grace) = match binary {
            "ipn-ingress" => (config.ingress.listen, config.ingress.shutdown_grace),
            _ => (config.worker.listen, config.worker.shutdown_grace),
        };
        let port = u64::from(listen.port());
        assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(port));
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(container[probe]["httpGet"]["path"], path, "{name} {probe}");
            assert_eq!(container[probe]["httpGet"]["port"].as_u64(), Some(port));
        }
        // The kubelet kills after terminationGracePeriodSeconds, counted from the preStop hook.
        let pause = container["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .and_then(|command| command.get(1)?.as_str()?.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        let grace = seconds(&spec["terminationGracePeriodSeconds"]);
        assert!(
            grace > pause + shutdown_grace,
            "{name}: {grace:?} vs {pause:?} + {shutdown_grace:?}"
        );
        assert_eq!(spec["enableServiceLinks"], false);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(spec["securityContext"]["runAsUser"].as_u64(), Some(10001));
    }
    // The Services point at the binaries' ports.
    let deployment = named(&docs, "Deployment", "ipn-ingress");
    let ingress = config_of(&docs, deployment);
    let service = named(&docs, "Service", "ipn-ingress");
    let ports = service["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1, "the public Service reaches one port");
    assert_eq!(
        ports[0]["targetPort"].as_u64(),
        Some(u64::from(ingress.ingress.listen.port()))
    );
    // The ingress's metrics are scraped on its admin port, which no Service exposes.
    let admin = ingress.ingress.admin_listen.expect("an admin listener");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(admin.port().to_string().as_str())
    );
    let declared = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(
        (declared.as_array().expect("ports").iter())
            .any(|p| p["containerPort"].as_u64() == Some(u64::from(admin.port()))),
        "{declared:?}"
    );
}

#[test]
fn an_ipn_variable_that_is_no_setting_is_ignored_but_a_misspelt_key_still_stops_the_binary() {
    let docs = manifest();
    let deployment = named(&docs, "Deployment", "ipn-worker");
    let toml = named(&docs, "ConfigMap", "ipn-bridge-config")["data"]["config.toml"]
        .as_str()
        .expect("config.toml")
        .to_owned();
    let mut env = environment(&docs, deployment);
    assert!(env.contains_key("IPN_PORT") && env.contains_key("IPN_WORKER_SERVICE_HOST"));
    assert!(Config::load(Some(&toml), &env).is_ok());
    env.insert("IPN_WORKER__CONCURRENCE".to_owned(), "8".to_owned());
    let error = Config::load(Some(&toml), &env).expect_err("a misspelt key is refused");
    assert!(error.to_string().contains("worker.concurrence"), "{error}");
}

//! Access to the real kube-apiserver + etcd started by `scripts/testenv`, and gateway replicas
//! as separate OS processes using the gateway's own ServiceAccount identity (deploy/rbac only).
//! If the testenv is not running, the first test starts it (`scripts/testenv up`); if that fails
//! the tests fail — they never skip.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use reqwest::StatusCode;
use signal_gateway::crd::RemediationRequest;

pub struct TestEnv {
    pub admin_kubeconfig: PathBuf,
    pub gateway_kubeconfig: PathBuf,
    pub namespace: String,
    pub repo: PathBuf,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/testenv <args>` and returns its stdout; panics with its output on failure.
pub fn testenv_cmd(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/testenv"))
        .args(args)
        .output()
        .expect("scripts/testenv runs");
    assert!(
        out.status.success(),
        "scripts/testenv {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn testenv() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        testenv_cmd(&["up"]);
        let vars: HashMap<String, String> = testenv_cmd(&["env"])
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches(|c| c == '"' || c == '\'').to_owned()))
            .collect();
        TestEnv {
            admin_kubeconfig: vars["KUBECONFIG"].clone().into(),
            gateway_kubeconfig: vars["GATEWAY_KUBECONFIG"].clone().into(),
            namespace: vars["GATEWAY_NAMESPACE"].clone(),
            repo: repo(),
        }
    })
}

pub async fn client_for(kubeconfig: &PathBuf) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig readable");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    signal_gateway::backend::kubernetes::KubernetesCluster::install_crypto_provider();
    kube::Client::try_from(config).expect("client")
}

pub async fn admin() -> kube::Client {
    client_for(&testenv().admin_kubeconfig).await
}

/// RRs with this fingerprint, read fresh by the admin.
pub async fn requests_for(client: &kube::Client, namespace: &str, fingerprint: &str) -> Vec<RemediationRequest> {
    let api: Api<RemediationRequest> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default().fields(&format!("spec.signalFingerprint={fingerprint}")))
        .await
        .expect("list")
        .items
}

/// A short random suffix so tests sharing one API server never collide.
pub fn unique() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// A port free now. Only for programs that cannot report a port they picked themselves: the port
/// can be taken before they bind it, so their start must handle "address already in use".
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The signals and admin addresses a gateway process bound, from its "signal-gateway started"
/// log line (JSON logs); panics with the log if the process exits or has not started within 60 s.
pub fn bound_addresses(name: &str, log: &std::path::Path, child: &mut Child) -> (String, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let started = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "signal-gateway started");
        if let Some(line) = started {
            let field = |k: &str| {
                line[k]
                    .as_str()
                    .unwrap_or_else(|| panic!("replica {name}: no {k} address in {line}"))
                    .to_owned()
            };
            return (field("signals"), field("admin"));
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("replica {name} exited ({status}) before it started; log:\n{text}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica {name} has not started within 60 s; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One gateway replica: a separate process with its own POD_NAME.
pub struct Replica {
    pub name: String,
    pub base: String,
    pub admin: String,
    pub log: PathBuf,
    child: Child,
}

impl Replica {
    /// Starts `name` with `config_yaml` against the testenv as the gateway ServiceAccount.
    pub fn start(name: &str, config_yaml: &str) -> Self {
        Self::start_as(name, config_yaml, &testenv().gateway_kubeconfig, &testenv().namespace)
    }

    pub fn start_as(name: &str, config_yaml: &str, kubeconfig: &std::path::Path, namespace: &str) -> Self {
        Self::spawn(
            name,
            config_yaml,
            "kubernetes",
            &[
                ("KUBECONFIG", kubeconfig.as_os_str()),
                ("POD_NAMESPACE", namespace.as_ref()),
            ],
        )
    }

    /// Starts `name` on the embedded backend (no testenv needed): a whole gateway as its own
    /// process, for what only a process shows (its memory, signals).
    pub fn start_embedded(name: &str, config_yaml: &str) -> Self {
        Self::spawn(name, config_yaml, "embedded", &[("POD_NAMESPACE", "signals".as_ref())])
    }

    fn spawn(name: &str, config_yaml: &str, backend: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let dir = repo().join("target/testenv/replicas");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join(format!("{name}.yaml"));
        // Authentication has its own tests; a config that does not mention it lets anyone send.
        let config_yaml = if config_yaml.lines().any(|l| l.starts_with("auth:")) {
            config_yaml.to_owned()
        } else {
            format!("auth:\n  mode: none\n{config_yaml}")
        };
        std::fs::write(&config, config_yaml).unwrap();
        let log = dir.join(format!("{name}.log"));
        // Port 0: the replica binds whatever port is free and logs it. A port picked here and
        // bound there later can be taken in between (an outgoing connection's ephemeral port):
        // a replica of a stressed run died of "Address already in use".
        let mut child = Command::new(env!("CARGO_BIN_EXE_signal-gateway"))
            .args(["serve", "--backend", backend, "--config"])
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env_remove("KUBECONFIG")
            .envs(env.iter().copied())
            .env("POD_NAME", name)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("gateway binary starts");
        let (signals, admin) = bound_addresses(name, &log, &mut child);
        Replica {
            name: name.to_owned(),
            base: format!("http://{signals}"),
            admin: format!("http://{admin}"),
            log,
            child,
        }
    }

    pub async fn readyz(&self, client: &reqwest::Client) -> Option<(u16, String)> {
        let r = client.get(format!("{}/readyz", self.admin)).send().await.ok()?;
        Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
    }

    pub async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = self.readyz(client).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {} never became ready; log:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metric(&self, client: &reqwest::Client, name: &str, labels: &[&str]) -> f64 {
        super::metric_sum(&self.metrics_text(client).await, name, labels)
    }

    /// The replica's /metrics.
    pub async fn metrics_text(&self, client: &reqwest::Client) -> String {
        client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replica {} ignored SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kubectl` as the testenv admin; panics with its stderr on failure.
/// Runs `scripts/testenv <command>` when dropped, to undo a fault a test injected (stopping the
/// API server, pausing etcd) even when an assertion fails while it lasts. Errors are ignored: the
/// drop may run during a panic, and undoing an undone fault does nothing.
pub struct UndoOnDrop {
    command: &'static str,
    only_on_panic: bool,
}

impl UndoOnDrop {
    /// Runs `command` whenever the guard is dropped.
    pub fn always(command: &'static str) -> Self {
        UndoOnDrop {
            command,
            only_on_panic: false,
        }
    }

    /// Runs `command` only when the guard is dropped by a panic (the test undoes the fault itself).
    pub fn on_panic(command: &'static str) -> Self {
        UndoOnDrop {
            command,
            only_on_panic: true,
        }
    }
}

impl Drop for UndoOnDrop {
    fn drop(&mut self) {
        if !self.only_on_panic || std::thread::panicking() {
            let _ = std::process::Command::new(repo().join("scripts/testenv"))
                .arg(self.command)
                .status();
        }
    }
}

/// Grants the gateway's service account `verbs` (comma-separated) on `resource` in every
/// namespace, through a ClusterRole and ClusterRoleBinding both named `role`; [`revoke`] removes them.
pub fn grant_to_gateway(role: &str, verbs: &str, resource: &str) {
    kubectl(&[
        "create",
        "clusterrole",
        role,
        &format!("--verb={verbs}"),
        &format!("--resource={resource}"),
    ]);
    kubectl(&[
        "create",
        "clusterrolebinding",
        role,
        "--clusterrole",
        role,
        "--serviceaccount",
        "signal-gateway:signal-gateway",
    ]);
}

/// Removes what [`grant_to_gateway`] created as `role`.
pub fn revoke(role: &str) {
    kubectl(&["delete", "clusterrolebinding", role]);
    kubectl(&["delete", "clusterrole", role]);
}

pub fn kubectl(args: &[&str]) -> String {
    let env = testenv();
    let out = Command::new(env.repo.join("target/testenv/bin/kubectl"))
        .arg("--kubeconfig")
        .arg(&env.admin_kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A signal sender for `auth.mode: kubernetes`: a ServiceAccount in a fresh namespace and a token
/// for it; `allowed` binds the sender Role of deploy/rbac/auth.yaml to it.
pub fn sender(allowed: bool) -> String {
    let ns = format!("senders-{}", unique());
    kubectl(&["create", "namespace", &ns]);
    kubectl(&["-n", &ns, "create", "serviceaccount", "alertmanager"]);
    if allowed {
        kubectl(&[
            "-n",
            &testenv().namespace,
            "create",
            "rolebinding",
            &format!("{ns}-sends"),
            "--role",
            "signal-gateway-sender",
            "--serviceaccount",
            &format!("{ns}:alertmanager"),
        ]);
    }
    kubectl(&["-n", &ns, "create", "token", "alertmanager", "--duration", "1h"])
}

impl Replica {
    /// The exit status if the process has ended (without waiting); None while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait on the replica process")
    }
}

/// The RemediationOrchestrator's status writes, made by the testenv admin (the gateway's RBAC
/// has no such write): a merge patch of the status subresource, as Kubernaut's controllers do.
pub struct AdminOrchestrator(pub kube::Client);

#[async_trait::async_trait]
impl super::contract::Orchestrator for AdminOrchestrator {
    async fn patch_status(
        &self,
        ns: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> Result<RemediationRequest, signal_gateway::cluster::ApiError> {
        let api: Api<RemediationRequest> = Api::namespaced(self.0.clone(), ns);
        api.patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "status": patch })),
        )
        .await
        .map_err(signal_gateway::backend::kubernetes::map_error)
    }

    async fn raw(&self, ns: &str, name: &str) -> serde_json::Value {
        raw_request(&self.0, ns, name).await
    }

    async fn create_replicaset(&self, ns: &str, name: &str, deployment: &str) {
        use k8s_openapi::api::apps::v1::ReplicaSet;
        let owners = serde_json::json!([{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
            "uid": "00000000-0000-4000-8000-00000000d001", "controller": true
        }]);
        let rs: ReplicaSet = serde_json::from_value(replicaset_manifest(ns, name, owners)).expect("a ReplicaSet");
        let api: Api<ReplicaSet> = Api::namespaced(self.0.clone(), ns);
        api.create(&kube::api::PostParams::default(), &rs)
            .await
            .expect("create the ReplicaSet");
    }

    async fn delete_replicaset(&self, ns: &str, name: &str) {
        let api: Api<k8s_openapi::api::apps::v1::ReplicaSet> = Api::namespaced(self.0.clone(), ns);
        api.delete(name, &kube::api::DeleteParams::default())
            .await
            .expect("delete the ReplicaSet");
    }
}

/// An RR exactly as the API server stores it (untyped JSON: nothing dropped by our types).
pub async fn raw_request(client: &kube::Client, ns: &str, name: &str) -> serde_json::Value {
    let resource = kube::api::ApiResource::erase::<RemediationRequest>(&());
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    serde_json::to_value(api.get(name).await.expect("get the RR")).expect("serialises")
}

/// `n` replicas named `<prefix>-<i>` with `config`, each ready, and a client for them.
pub async fn start_replicas(prefix: &str, n: usize, config: &str) -> (Vec<Replica>, reqwest::Client) {
    let client = super::client();
    let replicas: Vec<Replica> = (0..n)
        .map(|i| Replica::start(&format!("{prefix}-{i}"), config))
        .collect();
    for r in &replicas {
        r.wait_ready(&client).await;
    }
    (replicas, client)
}

/// Posts `count` copies of an alert for each pod, round-robin over the replicas, all at once.
pub async fn storm(
    replicas: &[Replica],
    client: &reqwest::Client,
    namespace: &str,
    pods: &[String],
    count: usize,
) -> Vec<(StatusCode, serde_json::Value)> {
    let mut tasks = Vec::new();
    let mut i = 0;
    for _ in 0..count {
        for pod in pods {
            let url = format!("{}/api/v1/signals/prometheus", replicas[i % replicas.len()].base);
            i += 1;
            let body = super::webhook(vec![super::pod_alert(namespace, pod)]).to_string();
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("request sent");
                let status = r.status();
                (status, r.json().await.unwrap_or(serde_json::Value::Null))
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A ReplicaSet `name` in `ns` with these `ownerReferences` and no replicas, as the Deployment
/// controller would write it (the testenv runs no controllers).
pub fn replicaset_manifest(ns: &str, name: &str, owners: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": ns, "ownerReferences": owners},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app"}]}
            }
        }
    })
}

/// Whether `lease` is held by the replica started as `pod_name` (holder identities carry a
/// per-process part: `<pod name>_<8 hex>`).
pub fn held_by(lease: &k8s_openapi::api::coordination::v1::Lease, pod_name: &str) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .is_some_and(|h| h.strip_prefix(pod_name).is_some_and(|rest| rest.starts_with('_')))
}

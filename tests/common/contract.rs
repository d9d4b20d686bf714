//! The contract of the `Cluster` port: the semantics the domain relies on. Runs against the
//! embedded store (tests/contract.rs) and against a real kube-apiserver (tests/testenv.rs), so
//! the embedded store cannot drift from the API server — including what a write keeps and drops:
//! the gateway's status write keeps every field the orchestrator wrote, and both backends prune
//! and refuse the same things.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use serde_json::json;
use signal_gateway::cluster::{ApiError, ApiKind, Call, Cluster, MetadataEvent, ObjectRef, RequestEvent, WatchEvent};
use signal_gateway::crd::{Deduplication, RemediationRequest, RemediationRequestSpec, TargetResource};

/// What the RemediationOrchestrator does to a request: a merge patch of its status through the
/// status subresource. Not part of the port (the gateway never does it); each backend's test
/// supplies it (the embedded store's `patch_status`, the admin client on the API server).
#[async_trait::async_trait]
pub trait Orchestrator: Send + Sync {
    async fn patch_status(
        &self,
        ns: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> Result<RemediationRequest, ApiError>;
    /// The stored object as the backend holds it, as JSON.
    async fn raw(&self, ns: &str, name: &str) -> serde_json::Value;
    /// Creates the ReplicaSet `name` controlled by the Deployment `deployment`, as the Deployment
    /// controller would (for the metadata watch).
    async fn create_replicaset(&self, ns: &str, name: &str, deployment: &str);
    /// Deletes the ReplicaSet `name`.
    async fn delete_replicaset(&self, ns: &str, name: &str);
}

fn fp(seed: &str) -> String {
    signal_gateway::fingerprint::Fingerprint::of(
        "",
        &TargetResource {
            kind: "Pod".into(),
            name: seed.into(),
            namespace: "contract".into(),
            api_version: String::new(),
        },
    )
    .to_string()
}

fn rr(ns: &str, name: &str, fingerprint: &str) -> RemediationRequest {
    RemediationRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: RemediationRequestSpec {
            signal_fingerprint: fingerprint.into(),
            signal_name: "ContractTest".into(),
            severity: "warning".into(),
            signal_type: "alert".into(),
            signal_source: "prometheus".into(),
            target_type: "kubernetes".into(),
            target_resource: TargetResource {
                kind: "Pod".into(),
                name: "p".into(),
                namespace: "contract".into(),
                api_version: "v1".into(),
            },
            firing_time: "2026-11-24T09:59:00Z".into(),
            received_time: "2026-11-24T10:00:00Z".into(),
            ..Default::default()
        },
        status: None,
    }
}

fn dedup(count: i32) -> Deduplication {
    Deduplication {
        first_seen_at: "2026-11-24T10:00:00Z".into(),
        last_seen_at: "2026-11-24T10:00:00Z".into(),
        occurrence_count: count,
    }
}

/// The status without the gateway's part.
fn orchestrators_part(rr: &serde_json::Value) -> serde_json::Value {
    let mut status = rr["status"].clone();
    if let Some(map) = status.as_object_mut() {
        map.remove("deduplication");
    }
    status
}

fn lease(ns: &str, name: &str, holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(30),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..Default::default()
        }),
    }
}

fn rv<T: kube::Resource>(o: &T) -> String {
    o.meta().resource_version.clone().unwrap()
}

/// Runs every contract case in namespace `ns` (which must exist and be empty of test objects).
/// `unique` keeps names apart between runs against a long-lived server.
pub async fn run(cluster: Arc<dyn Cluster>, orchestrator: &dyn Orchestrator, ns: &str, unique: &str) {
    requests(cluster.as_ref(), ns, unique).await;
    ownership(cluster.as_ref(), orchestrator, ns, unique).await;
    validation(cluster.as_ref(), orchestrator, ns, unique).await;
    watch(cluster.as_ref(), ns, unique).await;
    leases(cluster.as_ref(), ns, unique).await;
    metadata(cluster.as_ref(), ns).await;
    metadata_watch(cluster.as_ref(), orchestrator, ns, unique).await;
    discovery(cluster.as_ref()).await;
}

async fn requests(c: &dyn Cluster, ns: &str, unique: &str) {
    let (fa, fb) = (fp(&format!("a-{unique}")), fp(&format!("b-{unique}")));
    let a1 = format!("rr-a1-{unique}");

    // Create: server fills metadata; status is a subresource, so create ignores it.
    let created = c
        .create_request(Call::UNCOUNTED, &rr(ns, &a1, &fa))
        .await
        .expect("create");
    assert!(!rv(&created).is_empty());
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert!(
        created.status.as_ref().and_then(|s| s.deduplication.as_ref()).is_none(),
        "create must not set status: {:?}",
        created.status
    );

    assert_eq!(
        c.create_request(Call::UNCOUNTED, &rr(ns, &a1, &fa)).await.unwrap_err(),
        ApiError::AlreadyExists
    );
    assert_eq!(
        c.get_request(Call::UNCOUNTED, ns, &format!("rr-missing-{unique}"))
            .await
            .unwrap_err(),
        ApiError::NotFound
    );
    let got = c.get_request(Call::UNCOUNTED, ns, &a1).await.expect("get");
    assert_eq!(got.spec, created.spec);

    // Field-selected list returns exactly the fingerprint's objects.
    c.create_request(Call::UNCOUNTED, &rr(ns, &format!("rr-a2-{unique}"), &fa))
        .await
        .expect("create a2");
    c.create_request(Call::UNCOUNTED, &rr(ns, &format!("rr-b1-{unique}"), &fb))
        .await
        .expect("create b1");
    let mut names: Vec<String> = c
        .list_requests(Call::UNCOUNTED, ns, &fa)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.metadata.name.unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec![a1.clone(), format!("rr-a2-{unique}")]);
    assert_eq!(
        c.list_requests(Call::UNCOUNTED, ns, &fp(&format!("none-{unique}")))
            .await
            .expect("empty list")
            .len(),
        0
    );

    // Conditional write of the count: current rv wins and bumps rv; stale rv is Conflict.
    let updated = c
        .update_deduplication(Call::UNCOUNTED, ns, &a1, &rv(&got), &dedup(99))
        .await
        .expect("status write");
    assert_ne!(rv(&updated), rv(&got));
    assert_eq!(updated.occurrence_count(), 99);
    assert_eq!(updated.spec, got.spec, "a status write leaves the spec alone");
    assert!(
        matches!(
            c.update_deduplication(Call::UNCOUNTED, ns, &a1, &rv(&got), &dedup(100))
                .await
                .unwrap_err(),
            ApiError::Conflict(_)
        ),
        "stale resourceVersion"
    );
    assert_eq!(
        c.get_request(Call::UNCOUNTED, ns, &a1)
            .await
            .unwrap()
            .occurrence_count(),
        99,
        "a refused write changes nothing"
    );
    assert_eq!(
        c.update_deduplication(
            Call::UNCOUNTED,
            ns,
            &format!("rr-missing-{unique}"),
            &rv(&updated),
            &dedup(1)
        )
        .await
        .unwrap_err(),
        ApiError::NotFound
    );

    // A spec fingerprint that is not 64 hex characters is refused by validation.
    assert!(matches!(
        c.create_request(Call::UNCOUNTED, &rr(ns, &format!("rr-bad-{unique}"), "XYZ"))
            .await
            .unwrap_err(),
        ApiError::Invalid(_)
    ));
}

/// Every status field the orchestrator writes survives the gateway's status write unchanged.
async fn ownership(c: &dyn Cluster, o: &dyn Orchestrator, ns: &str, unique: &str) {
    let name = format!("rr-own-{unique}");
    let f = fp(&format!("own-{unique}"));
    c.create_request(Call::UNCOUNTED, &rr(ns, &name, &f))
        .await
        .expect("create");
    let written = o
        .patch_status(ns, &name, super::orchestrator_status())
        .await
        .expect("the orchestrator's status is valid");
    let before = o.raw(ns, &name).await;
    assert_eq!(
        orchestrators_part(&before),
        super::orchestrator_status(),
        "the backend keeps every orchestrator field as written"
    );
    let updated = c
        .update_deduplication(Call::UNCOUNTED, ns, &name, &rv(&written), &dedup(7))
        .await
        .expect("status write");
    assert_eq!(updated.occurrence_count(), 7);
    let after = o.raw(ns, &name).await;
    assert_eq!(
        orchestrators_part(&after),
        orchestrators_part(&before),
        "the gateway's write changes nothing it does not own"
    );
    assert_eq!(
        after["status"]["deduplication"],
        serde_json::to_value(dedup(7)).unwrap()
    );
    // And a second write only replaces the count it owns.
    c.update_deduplication(Call::UNCOUNTED, ns, &name, &rv(&updated), &dedup(8))
        .await
        .expect("status write");
    assert_eq!(orchestrators_part(&o.raw(ns, &name).await), orchestrators_part(&before));
}

/// Both backends refuse the same invalid objects and prune the same unknown fields.
async fn validation(c: &dyn Cluster, o: &dyn Orchestrator, ns: &str, unique: &str) {
    let f = fp(&format!("valid-{unique}"));
    let invalid = |mutate: fn(&mut RemediationRequestSpec), what: &'static str| {
        let mut bad = rr(ns, &format!("rr-invalid-{unique}"), &f);
        mutate(&mut bad.spec);
        (bad, what)
    };
    for (bad, what) in [
        invalid(|s| s.severity = String::new(), "empty severity"),
        invalid(|s| s.severity = "s".repeat(51), "severity over 50 characters"),
        invalid(|s| s.firing_time = String::new(), "firingTime not a date-time"),
        invalid(|s| s.target_type = "vmware".into(), "targetType outside its enum"),
        invalid(|s| s.signal_source = "s".repeat(64), "signalSource over 63 characters"),
    ] {
        assert!(
            matches!(c.create_request(Call::UNCOUNTED, &bad).await, Err(ApiError::Invalid(_))),
            "{what} is refused"
        );
    }
    let name = format!("rr-prune-{unique}");
    c.create_request(Call::UNCOUNTED, &rr(ns, &name, &f))
        .await
        .expect("create");
    o.patch_status(ns, &name, json!({"overallPhase": "Processing", "notInTheSchema": "x"}))
        .await
        .expect("unknown fields are pruned, not refused");
    let stored = o.raw(ns, &name).await;
    assert_eq!(stored["status"], json!({"overallPhase": "Processing"}), "pruned");
    assert!(
        matches!(
            o.patch_status(ns, &name, json!({"overallPhase": "Dancing"})).await,
            Err(ApiError::Invalid(_))
        ),
        "a phase outside the enum is refused"
    );
}

/// The next event of the watch about `name` (others may share the namespace), within 20 s.
async fn next_about(
    events: &mut futures::stream::BoxStream<'static, signal_gateway::cluster::Result<RequestEvent>>,
    name: &str,
) -> RemediationRequest {
    let wait = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match events.next().await.expect("the watch goes on").expect("no watch error") {
                RequestEvent::Applied(rr) if rr.metadata.name.as_deref() == Some(name) => return rr,
                _ => continue,
            }
        }
    });
    wait.await
        .unwrap_or_else(|_| panic!("no watch event about {name} within 20 s"))
}

async fn watch(c: &dyn Cluster, ns: &str, unique: &str) {
    let listed_before = format!("rr-a1-{unique}");
    let mut events = c.watch_requests(ns);
    // A list first: Init, every RR of the namespace, Synced.
    assert!(matches!(events.next().await, Some(Ok(RequestEvent::Init))));
    let mut listed = Vec::new();
    loop {
        match events.next().await.expect("the list completes").expect("no list error") {
            RequestEvent::Listed(rr) => listed.push(rr.metadata.name.clone().unwrap()),
            RequestEvent::Synced => break,
            other => panic!("unexpected {other:?} before Synced"),
        }
    }
    assert!(listed.contains(&listed_before), "the list holds existing RRs");

    // Then every change, with its new resourceVersion, in order.
    let name = format!("rr-w1-{unique}");
    let f = fp(&format!("w-{unique}"));
    let created = c
        .create_request(Call::UNCOUNTED, &rr(ns, &name, &f))
        .await
        .expect("create");
    let seen = next_about(&mut events, &name).await;
    assert_eq!(seen.metadata.resource_version, created.metadata.resource_version);
    let updated = c
        .update_deduplication(Call::UNCOUNTED, ns, &name, &rv(&created), &dedup(99))
        .await
        .expect("status write");
    let seen = next_about(&mut events, &name).await;
    assert_eq!(seen.metadata.resource_version, updated.metadata.resource_version);
    assert_eq!(
        seen.status.unwrap().deduplication.unwrap().occurrence_count,
        99,
        "the watch carries the status"
    );
}

async fn leases(c: &dyn Cluster, ns: &str, unique: &str) {
    let name = format!("gw-lock-contract-{unique}");
    let created = c
        .create_lease(Call::UNCOUNTED, &lease(ns, &name, "a"))
        .await
        .expect("create lease");
    assert_eq!(
        c.create_lease(Call::UNCOUNTED, &lease(ns, &name, "b"))
            .await
            .unwrap_err(),
        ApiError::AlreadyExists
    );
    let got = c.get_lease(Call::UNCOUNTED, ns, &name).await.expect("get lease");
    assert_eq!(rv(&got), rv(&created));

    let mut mine = got.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    mine.metadata.annotations = Some([("signal-gateway.kubernaut.ai/creating".to_owned(), "rr-x-2".to_owned())].into());
    let updated = c
        .update_lease(Call::UNCOUNTED, &mine)
        .await
        .expect("conditional update");
    assert_eq!(updated.spec.as_ref().unwrap().holder_identity.as_deref(), Some("b"));
    assert_eq!(
        c.get_lease(Call::UNCOUNTED, ns, &name)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap()["signal-gateway.kubernaut.ai/creating"],
        "rr-x-2",
        "an update writes the annotations it carries"
    );
    assert!(
        matches!(
            c.update_lease(Call::UNCOUNTED, &mine).await.unwrap_err(),
            ApiError::Conflict(_)
        ),
        "stale rv"
    );

    assert!(
        matches!(
            c.delete_lease(Call::UNCOUNTED, ns, &name, &rv(&got)).await.unwrap_err(),
            ApiError::Conflict(_)
        ),
        "delete precondition"
    );
    assert!(
        c.get_lease(Call::UNCOUNTED, ns, &name).await.is_ok(),
        "a failed precondition deletes nothing"
    );
    c.delete_lease(Call::UNCOUNTED, ns, &name, &rv(&updated))
        .await
        .expect("delete with current rv");
    assert_eq!(
        c.get_lease(Call::UNCOUNTED, ns, &name).await.unwrap_err(),
        ApiError::NotFound
    );
    assert_eq!(
        c.delete_lease(Call::UNCOUNTED, ns, &name, &rv(&updated))
            .await
            .unwrap_err(),
        ApiError::NotFound
    );
    // Leases allow create-on-update: a PUT to a missing name creates it (the sent
    // resourceVersion is ignored). The lock relies on nothing else, but the store must agree.
    let missing_name = format!("gw-lock-missing-{unique}");
    let mut missing = lease(ns, &missing_name, "a");
    missing.metadata.resource_version = Some(rv(&updated));
    let recreated = c
        .update_lease(Call::UNCOUNTED, &missing)
        .await
        .expect("update of a missing lease creates it");
    assert_eq!(recreated.spec.as_ref().unwrap().holder_identity.as_deref(), Some("a"));
    c.delete_lease(Call::UNCOUNTED, ns, &missing_name, &rv(&recreated))
        .await
        .expect("clean up");
}

async fn metadata(c: &dyn Cluster, ns: &str) {
    let pod = ObjectRef {
        api_version: "v1".into(),
        kind: "Pod".into(),
        resource: String::new(),
        namespace: ns.into(),
        name: "no-such-pod".into(),
    };
    assert_eq!(
        c.get_metadata(Call::UNCOUNTED, &pod).await.unwrap_err(),
        ApiError::NotFound
    );
}

/// A metadata watch of ReplicaSets lists them with their metadata (name, namespace,
/// resourceVersion, the controller ownerReference), then delivers creations and deletions.
async fn metadata_watch(c: &dyn Cluster, orchestrator: &dyn Orchestrator, ns: &str, unique: &str) {
    let (a, b) = (format!("rs-a-{unique}"), format!("rs-b-{unique}"));
    orchestrator.create_replicaset(ns, &a, "deploy-a").await;
    let kind = signal_gateway::discovery::builtin("ReplicaSet").unwrap();
    let mut events = c.watch_metadata(&kind);
    let within = std::time::Duration::from_secs(30);
    // Ours (in `ns`, named `rs-*-{unique}`) and the list markers; other namespaces' objects skipped.
    let mut next = async || -> MetadataEvent {
        loop {
            let event = tokio::time::timeout(within, events.next())
                .await
                .expect("a metadata watch event within 30 s")
                .expect("the watch goes on")
                .expect("no watch error");
            match &event {
                WatchEvent::Listed(m) | WatchEvent::Applied(m) | WatchEvent::Deleted(m)
                    if m.namespace.as_deref() != Some(ns)
                        || !m.name.as_deref().is_some_and(|n| n.ends_with(unique)) => {}
                _ => return event,
            }
        }
    };
    assert!(matches!(next().await, WatchEvent::Init));
    let WatchEvent::Listed(listed) = next().await else {
        panic!("the ReplicaSet listed")
    };
    assert_eq!(listed.name.as_deref(), Some(a.as_str()));
    assert!(listed.resource_version.as_deref().is_some_and(|rv| !rv.is_empty()));
    let owners = listed.owner_references.unwrap_or_default();
    assert_eq!(
        owners
            .iter()
            .map(|o| (o.kind.as_str(), o.name.as_str(), o.controller))
            .collect::<Vec<_>>(),
        [("Deployment", "deploy-a", Some(true))]
    );
    assert!(matches!(next().await, WatchEvent::Synced));

    orchestrator.create_replicaset(ns, &b, "deploy-b").await;
    match next().await {
        WatchEvent::Applied(m) => assert_eq!(m.name.as_deref(), Some(b.as_str())),
        other => panic!("expected the creation, got {other:?}"),
    }
    orchestrator.delete_replicaset(ns, &a).await;
    loop {
        match next().await {
            WatchEvent::Deleted(m) => {
                assert_eq!(m.name.as_deref(), Some(a.as_str()));
                break;
            }
            // The API server may deliver updates (its finalisation of the deletion) first.
            WatchEvent::Applied(m) if m.name.as_deref() == Some(a.as_str()) => {}
            other => panic!("expected the deletion, got {other:?}"),
        }
    }
    orchestrator.delete_replicaset(ns, &b).await;
}

/// Discovery names the built-in kinds the gateway reads as the API server serves them, each group
/// in its own document, the preferred version first.
async fn discovery(c: &dyn Cluster) {
    let core = c.list_api_kinds(Call::UNCOUNTED, true).await.expect("core discovery");
    let named = c.list_api_kinds(Call::UNCOUNTED, false).await.expect("named discovery");
    let find = |kinds: &[ApiKind], group: &str, kind: &str| {
        kinds
            .iter()
            .find(|k| k.group == group && k.kind == kind)
            .cloned()
            .unwrap_or_else(|| panic!("{group}/{kind} not discovered"))
    };
    for (group, kind, resource, namespaced) in [
        ("", "Pod", "pods", true),
        ("", "Namespace", "namespaces", false),
        ("", "Endpoints", "endpoints", true),
    ] {
        let k = find(&core, group, kind);
        assert_eq!(
            (k.resource.as_str(), k.namespaced, k.version.as_str()),
            (resource, namespaced, "v1")
        );
    }
    for (group, kind, resource) in [
        ("apps", "Deployment", "deployments"),
        ("batch", "CronJob", "cronjobs"),
        ("networking.k8s.io", "NetworkPolicy", "networkpolicies"),
        ("networking.k8s.io", "Ingress", "ingresses"),
    ] {
        let k = find(&named, group, kind);
        assert_eq!(
            (k.resource.as_str(), k.version.as_str()),
            (resource, "v1"),
            "{group}/{kind}"
        );
    }
    assert!(core.iter().all(|k| k.group.is_empty()) && named.iter().all(|k| !k.group.is_empty()));
}

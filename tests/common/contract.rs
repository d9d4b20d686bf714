//! The contract of the `Cluster` port: the semantics the domain relies on. Runs against the
//! embedded store (tests/contract.rs) and against a real kube-apiserver (tests/testenv.rs), so
//! the embedded store cannot drift from the API server.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use signal_gateway::cluster::{ApiError, ApiKind, Cluster, ObjectRef, RequestEvent};
use signal_gateway::crd::{
    Deduplication, RemediationRequest, RemediationRequestSpec, RemediationRequestStatus, TargetResource,
};

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
            signal_type: "prometheus-alert".into(),
            signal_source: "contract".into(),
            target_type: "kubernetes".into(),
            target_resource: TargetResource {
                kind: "Pod".into(),
                name: "p".into(),
                namespace: "contract".into(),
                api_version: "v1".into(),
            },
            received_time: "2026-11-24T10:00:00Z".into(),
            ..Default::default()
        },
        status: Some(RemediationRequestStatus {
            deduplication: Some(Deduplication {
                first_seen_at: "a".into(),
                last_seen_at: "a".into(),
                occurrence_count: 99,
            }),
            overall_phase: String::new(),
        }),
    }
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
pub async fn run(cluster: Arc<dyn Cluster>, ns: &str, unique: &str) {
    requests(cluster.as_ref(), ns, unique).await;
    watch(cluster.as_ref(), ns, unique).await;
    leases(cluster.as_ref(), ns, unique).await;
    metadata(cluster.as_ref(), ns).await;
    discovery(cluster.as_ref()).await;
}

async fn requests(c: &dyn Cluster, ns: &str, unique: &str) {
    let (fa, fb) = (fp(&format!("a-{unique}")), fp(&format!("b-{unique}")));
    let a1 = format!("rr-a1-{unique}");

    // Create: server fills metadata; status is a subresource, so create ignores it.
    let created = c.create_request(&rr(ns, &a1, &fa)).await.expect("create");
    assert!(!rv(&created).is_empty());
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert!(
        created.status.as_ref().and_then(|s| s.deduplication.as_ref()).is_none(),
        "create must not set status: {:?}",
        created.status
    );

    assert_eq!(
        c.create_request(&rr(ns, &a1, &fa)).await.unwrap_err(),
        ApiError::AlreadyExists
    );
    assert_eq!(
        c.get_request(ns, &format!("rr-missing-{unique}")).await.unwrap_err(),
        ApiError::NotFound
    );
    let got = c.get_request(ns, &a1).await.expect("get");
    assert_eq!(got.spec, created.spec);

    // Field-selected list returns exactly the fingerprint's objects.
    c.create_request(&rr(ns, &format!("rr-a2-{unique}"), &fa))
        .await
        .expect("create a2");
    c.create_request(&rr(ns, &format!("rr-b1-{unique}"), &fb))
        .await
        .expect("create b1");
    let mut names: Vec<String> = c
        .list_requests(ns, &fa)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.metadata.name.unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec![a1.clone(), format!("rr-a2-{unique}")]);
    assert_eq!(
        c.list_requests(ns, &fp(&format!("none-{unique}")))
            .await
            .expect("empty list")
            .len(),
        0
    );

    // Conditional status update: current rv wins and bumps rv; stale rv is Conflict.
    let mut next = got.clone();
    next.status = rr(ns, &a1, &fa).status;
    let updated = c.update_request_status(&next).await.expect("status update");
    assert_ne!(rv(&updated), rv(&got));
    assert_eq!(
        updated
            .status
            .as_ref()
            .unwrap()
            .deduplication
            .as_ref()
            .unwrap()
            .occurrence_count,
        99
    );
    assert_eq!(updated.spec, got.spec, "status update leaves spec alone");
    assert!(
        matches!(c.update_request_status(&next).await.unwrap_err(), ApiError::Conflict(_)),
        "stale resourceVersion"
    );
    let mut gone = rr(ns, &format!("rr-missing-{unique}"), &fa);
    gone.metadata.resource_version = Some(rv(&updated));
    assert_eq!(c.update_request_status(&gone).await.unwrap_err(), ApiError::NotFound);
    // A uid in the sent object is a precondition too: another object's uid is a Conflict.
    let mut wrong_uid = c.get_request(ns, &a1).await.expect("get");
    wrong_uid.metadata.uid = c
        .get_request(ns, &format!("rr-b1-{unique}"))
        .await
        .expect("get b1")
        .metadata
        .uid;
    assert!(
        matches!(
            c.update_request_status(&wrong_uid).await.unwrap_err(),
            ApiError::Conflict(_)
        ),
        "uid precondition"
    );

    // A spec fingerprint that is not 64 hex characters is refused by validation.
    assert!(matches!(
        c.create_request(&rr(ns, &format!("rr-bad-{unique}"), "XYZ"))
            .await
            .unwrap_err(),
        ApiError::Invalid(_)
    ));
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
    let created = c.create_request(&rr(ns, &name, &f)).await.expect("create");
    let seen = next_about(&mut events, &name).await;
    assert_eq!(seen.metadata.resource_version, created.metadata.resource_version);
    let mut next = created.clone();
    next.status = rr(ns, &name, &f).status;
    let updated = c.update_request_status(&next).await.expect("status update");
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
    let created = c.create_lease(&lease(ns, &name, "a")).await.expect("create lease");
    assert_eq!(
        c.create_lease(&lease(ns, &name, "b")).await.unwrap_err(),
        ApiError::AlreadyExists
    );
    let got = c.get_lease(ns, &name).await.expect("get lease");
    assert_eq!(rv(&got), rv(&created));

    let mut mine = got.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let updated = c.update_lease(&mine).await.expect("conditional update");
    assert_eq!(updated.spec.as_ref().unwrap().holder_identity.as_deref(), Some("b"));
    assert!(
        matches!(c.update_lease(&mine).await.unwrap_err(), ApiError::Conflict(_)),
        "stale rv"
    );

    assert!(
        matches!(
            c.delete_lease(ns, &name, &rv(&got)).await.unwrap_err(),
            ApiError::Conflict(_)
        ),
        "delete precondition"
    );
    assert!(
        c.get_lease(ns, &name).await.is_ok(),
        "a failed precondition deletes nothing"
    );
    c.delete_lease(ns, &name, &rv(&updated))
        .await
        .expect("delete with current rv");
    assert_eq!(c.get_lease(ns, &name).await.unwrap_err(), ApiError::NotFound);
    assert_eq!(
        c.delete_lease(ns, &name, &rv(&updated)).await.unwrap_err(),
        ApiError::NotFound
    );
    // Leases allow create-on-update: a PUT to a missing name creates it (the sent
    // resourceVersion is ignored). The lock relies on nothing else, but the store must agree.
    let missing_name = format!("gw-lock-missing-{unique}");
    let mut missing = lease(ns, &missing_name, "a");
    missing.metadata.resource_version = Some(rv(&updated));
    let recreated = c
        .update_lease(&missing)
        .await
        .expect("update of a missing lease creates it");
    assert_eq!(recreated.spec.as_ref().unwrap().holder_identity.as_deref(), Some("a"));
    c.delete_lease(ns, &missing_name, &rv(&recreated))
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
    assert_eq!(c.get_metadata(&pod).await.unwrap_err(), ApiError::NotFound);
}

/// Discovery names the built-in kinds the gateway reads as the API server serves them, each group
/// in its own document, the preferred version first.
async fn discovery(c: &dyn Cluster) {
    let core = c.list_api_kinds(true).await.expect("core discovery");
    let named = c.list_api_kinds(false).await.expect("named discovery");
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

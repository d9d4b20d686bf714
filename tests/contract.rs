//! The port contract against the embedded store (the real API server runs it in testenv.rs).

mod common;

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::{ApiError, Call, Cluster, ObjectRef};
use signal_gateway::crd::RemediationRequest;

/// The orchestrator's status writes on the embedded store.
struct Orchestrator(Arc<EmbeddedStore>);

#[async_trait::async_trait]
impl common::contract::Orchestrator for Orchestrator {
    async fn patch_status(
        &self,
        ns: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> Result<RemediationRequest, ApiError> {
        self.0.patch_status(ns, name, &patch)
    }

    async fn raw(&self, ns: &str, name: &str) -> serde_json::Value {
        let rr = self.0.get_request(Call::UNCOUNTED, ns, name).await.expect("stored");
        serde_json::to_value(rr).expect("serialises")
    }

    async fn create_replicaset(&self, ns: &str, name: &str, deployment: &str) {
        let meta = ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: deployment.into(),
                uid: "00000000-0000-4000-8000-00000000d001".into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        };
        self.0.put_object(replicaset(ns, name), meta);
    }

    async fn delete_replicaset(&self, ns: &str, name: &str) {
        self.0.delete_object(&replicaset(ns, name)).expect("stored");
    }
}

fn replicaset(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        resource: "replicasets".into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn embedded_store_honours_the_cluster_port_contract() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    common::contract::run(store.clone(), &Orchestrator(store), "contract", "x").await;
}

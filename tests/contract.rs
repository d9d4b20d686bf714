//! The port contract against the embedded store (the real API server runs it in testenv.rs).

mod common;

use std::sync::Arc;

use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::{ApiError, Cluster};
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
        let rr = self.0.get_request(ns, name).await.expect("stored");
        serde_json::to_value(rr).expect("serialises")
    }
}

#[tokio::test]
async fn embedded_store_honours_the_cluster_port_contract() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    common::contract::run(store.clone(), &Orchestrator(store), "contract", "x").await;
}

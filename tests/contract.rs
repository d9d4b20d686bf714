//! The port contract against the embedded store (the real API server runs it in testenv.rs).

mod common;

use std::sync::Arc;

use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::clock::SystemClock;

#[tokio::test]
async fn embedded_store_honours_the_cluster_port_contract() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    common::contract::run(store, "contract", "x").await;
}

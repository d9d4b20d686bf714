//! Generated files are checked: the CRD in deploy/ is exactly what `signal-gateway crd` prints.

#[test]
fn deploy_crd_matches_the_rust_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/crds/remediationrequests.kubernaut.ai.yaml"
    );
    let on_disk = std::fs::read_to_string(path).expect("deploy/crds/remediationrequests.kubernaut.ai.yaml exists");
    assert!(
        on_disk == signal_gateway::crd::crd_yaml(),
        "deploy/crds is stale: run `cargo run -- crd > deploy/crds/remediationrequests.kubernaut.ai.yaml`"
    );
}

#[test]
fn the_crd_command_prints_the_same_yaml() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_signal-gateway"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), signal_gateway::crd::crd_yaml());
}

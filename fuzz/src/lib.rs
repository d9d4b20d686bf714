//! Shared code of the cargo-fuzz targets (docs/fuzzing.md): the invariants each input is checked
//! against, the byte decoder, and the owner-resolution and HTTP harnesses.

pub mod bytes;
pub mod http;
pub mod invariants;
pub mod resolution;

/// The runtime every async target runs on: current-thread, built once per process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

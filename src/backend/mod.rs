//! Adapters behind the [`crate::cluster::Cluster`] port, and the metering decorator that
//! counts every call at the boundary.

pub mod embedded;
pub mod faults;
pub mod kubernetes;
pub mod metered;
pub mod review;
pub mod schema;

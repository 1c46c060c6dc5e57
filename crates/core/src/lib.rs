//! Pure algorithm of mulo: token grids, conditions, sampling parameters and their validation.
//!
//! This crate has no torch and no gRPC dependency so that it can be property-tested quickly and
//! shared by every role.

pub mod caption;
pub mod condition;
pub mod grid;
pub mod limits;
pub mod method;
pub mod metrics;
pub mod params;
pub mod spec;

pub use condition::Condition;
pub use grid::{GridSize, TokenGrid};
pub use method::{Method, MuloParams, Rejection};
pub use params::{ParamError, SamplingParams};

//! Training and evaluation data sets.

pub mod emoji;
#[doc(hidden)]
pub mod synthetic;

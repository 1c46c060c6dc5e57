//! Training and evaluation data sets.

pub mod emoji;
pub mod images;
#[doc(hidden)]
pub mod synthetic;

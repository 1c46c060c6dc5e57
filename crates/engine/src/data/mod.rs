//! Training and evaluation data sets.

pub mod emoji;

//! mulo's training side (DESIGN §8): the data sets (emoji from npm, synthetic test data), the
//! trainers of the bundled family, evaluation (FID-emoji, adherence) and the benchmark's library.
//! The services do not link it.

pub mod bench;
pub mod data;
pub mod error;
pub mod eval;
pub mod load;
pub mod trainers;

pub use error::TrainError;

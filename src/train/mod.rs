//! DreamBooth-LoRA fine-tuning: teach the model a subject from a few photos.
//!
//! [`adapters`] attaches LoRA factors to the attention projections and names them as kohya
//! does; [`step`] is the loss, gradients and AdamW update; [`data`] reads and encodes the
//! photos once; [`recorded`] replays steps recorded on a GPU; [`state`] writes the LoRA and resumable checkpoints; [`run`] drives it all.

pub mod adapters;
pub mod data;
pub mod options;
pub mod recorded;
pub mod report;
pub mod run;
pub mod schedule;
pub mod session;
pub mod state;
pub mod step;

pub use options::TrainOptions;
pub use run::Trainer;
pub use session::{train, train_until};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Options(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Model(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("{0}")]
    Io(String),
    #[error("interrupted at step {step}; checkpoint saved. Continue with --resume {}", dir.display())]
    Interrupted { step: usize, dir: std::path::PathBuf },
}

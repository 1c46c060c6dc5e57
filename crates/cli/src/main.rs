//! `mulo`: generate images with LlamaGen-style autoregressive models, score token grids, decode
//! them, convert LlamaGen checkpoints and inspect model directories.

mod bench;
mod bench_load;
mod card;
mod cluster;
mod common;
mod convert;
mod convert_t5;
mod data;
mod decode;
mod embed_text;
mod encode;
mod eval;
mod family;
mod generate;
mod info;
mod init;
mod map;
mod plot;
mod plot_load;
mod score;
mod train;
mod vq_probe;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mulo: fast autoregressive image generation (MuLo-SD) on LlamaGen-style models.
#[derive(Debug, Parser)]
#[command(
    name = "mulo",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Examples:\n  mulo init vq --out m/vq && mulo init gpt --out m/c2i --vq ../vq\n  mulo generate --model m/c2i --class 3 --seed 1 --out a.png --tokens-out a.json\n  mulo score --model m/c2i --class 3 --tokens a.json --out s.json --top-k 0 --top-p 1\n  mulo convert llamagen --kind c2i --checkpoint c2i_L_256.pt --out m/c2i-L --preset GPT-L\n\nSee docs/cli.md for the sampling semantics and file formats."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate one image from a prompt, a class id or caption features.
    Generate(generate::GenerateArgs),
    /// Teacher-forced processed log-probabilities of a token grid (JSON).
    Score(score::ScoreArgs),
    /// Decode a token grid to a PNG with a VQ model.
    Decode(decode::DecodeArgs),
    /// Encode an image to a token grid with a VQ model.
    Encode(encode::EncodeArgs),
    /// Caption features of prompts with a T5 text encoder (.npy, LlamaGen's layout).
    EmbedText(embed_text::EmbedTextArgs),
    /// Convert a checkpoint of another project into mulo's model format.
    #[command(subcommand)]
    Convert(convert::ConvertCommand),
    /// Assemble a model family from model directories (docs/family.md).
    #[command(subcommand)]
    Family(family::FamilyCommand),
    /// Build a training data set.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a model of the emoji family.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// FID-emoji and adherence of generation methods over a prompt list (JSON report).
    Eval(eval::EvalArgs),
    /// Compare methods (AR, SD, LANTERN, MuLo-SD) on speed and quality in one run.
    Bench(bench::BenchArgs),
    /// Show what a model directory holds.
    Info(info::InfoArgs),
    /// Where a VQ tokenizer loses detail: held-out PSNR with and without quantisation (JSON).
    VqProbe(vq_probe::VqProbeArgs),
    /// Write a randomly initialised model (for demos and tests).
    #[command(subcommand)]
    Init(init::InitCommand),
}

fn main() -> ExitCode {
    // An unexpected panic (a bug) still ends in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let msg = msg.replace('\n', " ");
        eprintln!("error: internal error: {msg}");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One clear line: clap's first line, without the usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Decode(a) => decode::run(a),
        Command::Encode(a) => encode::run(a),
        Command::Convert(c) => convert::run(c),
        Command::EmbedText(a) => embed_text::run(a),
        Command::Info(a) => info::run(a),
        Command::Family(c) => family::run(c),
        Command::VqProbe(a) => vq_probe::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Data(c) => data::run(c),
        Command::Train(c) => train::run(c),
        Command::Init(c) => init::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

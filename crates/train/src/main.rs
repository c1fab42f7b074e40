//! `ternlm-train`: BitDistill's training stages (work in progress; see the crate docs).

fn main() {
    eprintln!("ternlm-train: the training commands (finetune, distill) are not built yet; the library has the model, losses and export");
    std::process::exit(2);
}

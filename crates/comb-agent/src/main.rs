//! combd: the per-node agent binary; everything lives in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    comb_agent::main()
}

fn main() -> std::process::ExitCode {
    comb_agent::main()
}

use std::process::ExitCode;

fn main() -> ExitCode {
    liederiv::cli::main()
}

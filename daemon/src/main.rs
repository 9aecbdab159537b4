//! `liveomics`: the command line over the library; the subcommands and the exit codes are in
//! `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}

//! `hutch completions bash|zsh|fish`: the shell completion script, generated from the CLI's own
//! definition (clap_complete), so it always matches the commands and flags of this binary.

use clap::CommandFactory;

/// The shells `hutch completions` writes a script for.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The completion script for `shell`.
pub(crate) fn script(shell: Shell) -> Vec<u8> {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut crate::Cli::command(), "hutch", &mut out);
    out
}

/// Writes the completion script for `shell` to stdout (a reader that stops early, as `head`
/// does, is no error).
pub(crate) fn print(shell: Shell) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(&script(shell)).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

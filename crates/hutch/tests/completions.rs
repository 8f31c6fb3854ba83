//! `hutch completions bash|zsh|fish`: the bash script, sourced in a real bash, completes
//! subcommands and their own subcommands; the zsh and fish scripts name the subcommands (and
//! pass the shells' own syntax checks where those shells are installed). No hutchd needed.

use std::process::Command;

fn completions(shell: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_hutch"))
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hutch completions {shell}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// What bash's completion for `hutch` offers for the command line `words` (the last word is
/// the one being completed), as bash would ask it: COMP_WORDS, COMP_CWORD, COMP_LINE,
/// COMP_POINT set, the function `complete -p hutch` names called with the command, the word
/// and the previous word.
fn bash_complete(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        r#"set -e
source '{script}'
spec=$(complete -p hutch)
fn=$(sed -E 's/.* -F ([^ ]+) .*/\1/' <<<"$spec")
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
prev=""
if (( COMP_CWORD > 0 )); then prev=${{COMP_WORDS[COMP_CWORD-1]}}; fi
"$fn" hutch "${{COMP_WORDS[COMP_CWORD]}}" "$prev"
printf '%s\n' "${{COMPREPLY[@]}}"
"#,
        script = script.display(),
        words = quoted.join(" ")
    );
    let o = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &prog])
        .output()
        .expect("bash");
    assert!(
        o.status.success(),
        "bash completion of {words:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn completion_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("hutch.bash");
    std::fs::write(&bash, completions("bash")).unwrap();
    let mut ne = bash_complete(&bash, &["hutch", "ne"]);
    ne.sort();
    assert_eq!(ne, vec!["net", "new"]);
    let mut image = bash_complete(&bash, &["hutch", "image", "p"]);
    image.sort();
    assert_eq!(image, vec!["pull", "push"]);
    let all = bash_complete(&bash, &["hutch", ""]);
    for sub in ["new", "exec", "image", "completions", "ls"] {
        assert!(all.iter().any(|w| w == sub), "{sub} not in {all:?}");
    }
    let flags = bash_complete(&bash, &["hutch", "new", "--im"]);
    assert_eq!(flags, vec!["--image"]);

    for (shell, check) in [("zsh", ["zsh", "-n"]), ("fish", ["fish", "--no-execute"])] {
        let s = completions(shell);
        for sub in ["new", "exec", "image", "pull", "completions"] {
            assert!(s.contains(sub), "{shell} script does not mention {sub}");
        }
        // The shell's own syntax check, where that shell is installed.
        let f = dir.path().join(format!("hutch.{shell}"));
        std::fs::write(&f, &s).unwrap();
        if let Ok(o) = Command::new(check[0]).arg(check[1]).arg(&f).output() {
            assert!(
                o.status.success(),
                "{shell} rejects its script: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    // An unknown shell is refused by name.
    let o = Command::new(env!("CARGO_BIN_EXE_hutch"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bash, zsh, fish"));
}

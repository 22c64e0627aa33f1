//! Flag files: `weft sidecar @sidecar.flags` replaces the `@sidecar.flags`
//! argument with the flags written in that file, one flag a line.
//!
//! File format:
//! - blank lines and lines starting with `#` are skipped (comments are whole
//!   lines only: `#` after a flag is part of its value);
//! - each line is trimmed; `--flag value with spaces` becomes the two
//!   arguments `--flag` and `value with spaces` (split at the first run of
//!   whitespace); `--flag=value` stays one argument;
//! - a value wrapped in double quotes loses them (`--name "a b"`,
//!   `--name="a b"`); there are no escapes;
//! - a line `@other.flags` is expanded in place too, at most
//!   [`MAX_DEPTH`] files deep, and a file may not include itself;
//! - every other line is an error: each line must be a flag;
//! - after a `--` line, each remaining line is one plain argument, as is.
//!
//! Relative paths, on the command line or in a file, are relative to the
//! current directory. The first argument (the program name) is never
//! expanded, nor is anything after a `--` argument. Arguments that are not
//! valid UTF-8 are passed through untouched.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How many flag files may be open at once (a file on the command line is 1).
pub const MAX_DEPTH: usize = 8;

/// Why the flag files could not be expanded.
#[derive(Debug, thiserror::Error)]
pub enum ArgfileError {
    #[error(
        "cannot read flag file {}{}: {source}; check the path after '@' \
         (relative paths start at the current directory)",
        .path.display(), included_from(.from)
    )]
    Read {
        path: PathBuf,
        /// The file and line that named `path`, if it was not the command line.
        from: Option<(PathBuf, usize)>,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "flag file {}, line {line}: expected a flag like --mesh FILE, got {text:?}; \
         write one flag per line, with its value on the same line",
        .path.display()
    )]
    NotAFlag {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "flag file {}, line {line}: the value {text:?} opens a double quote it does not close; \
         end the line with '\"' or drop the opening one",
        .path.display()
    )]
    UnclosedQuote {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "flag file {}, line {line}: including {} would nest flag files more than {MAX_DEPTH} \
         deep; flatten them",
        .path.display(), .target.display()
    )]
    TooDeep {
        path: PathBuf,
        line: usize,
        target: PathBuf,
    },
    #[error(
        "flag file {}, line {line}: {} is already being read (it includes itself); \
         remove the @ line that closes the cycle",
        .path.display(), .target.display()
    )]
    Cycle {
        path: PathBuf,
        line: usize,
        target: PathBuf,
    },
}

fn included_from(from: &Option<(PathBuf, usize)>) -> String {
    match from {
        Some((file, line)) => format!(" (named in {}, line {line})", file.display()),
        None => String::new(),
    }
}

/// Expand every `@file` argument (after the program name, before any `--`)
/// into the flags that file holds.
pub fn expand(args: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>, ArgfileError> {
    // An empty base: relative paths are opened relative to the current directory.
    expand_from(args, Path::new(""))
}

/// [`expand`], with relative paths resolved against `base` (for tests).
fn expand_from(
    args: impl IntoIterator<Item = OsString>,
    base: &Path,
) -> Result<Vec<OsString>, ArgfileError> {
    let mut args = args.into_iter();
    let mut ex = Expander {
        base,
        out: Vec::new(),
        open: Vec::new(),
        after_dash_dash: false,
    };
    ex.out.extend(args.next());
    for arg in args {
        match arg.to_str().and_then(argfile_path) {
            Some(path) if !ex.after_dash_dash => ex.file(path, None)?,
            _ => {
                if arg == "--" {
                    ex.after_dash_dash = true;
                }
                ex.out.push(arg);
            }
        }
    }
    Ok(ex.out)
}

/// The path named by an `@path` argument or line, if it is one.
fn argfile_path(s: &str) -> Option<&str> {
    s.strip_prefix('@').filter(|p| !p.is_empty())
}

struct Expander<'a> {
    base: &'a Path,
    out: Vec<OsString>,
    /// The files being read, outermost first, as canonical paths (to find cycles).
    open: Vec<PathBuf>,
    /// Set once a `--` was emitted: `@` after it is a plain argument.
    after_dash_dash: bool,
}

impl Expander<'_> {
    /// Expand the file at `name` (as written), named at `from` (file, line).
    fn file(&mut self, name: &str, from: Option<(&Path, usize)>) -> Result<(), ArgfileError> {
        let path = self.base.join(name);
        let read_error = |source| ArgfileError::Read {
            path: path.clone(),
            from: from.map(|(f, l)| (f.to_path_buf(), l)),
            source,
        };
        let canonical = std::fs::canonicalize(&path).map_err(read_error)?;
        if let Some((file, line)) = from {
            if self.open.contains(&canonical) {
                return Err(ArgfileError::Cycle {
                    path: file.to_path_buf(),
                    line,
                    target: path,
                });
            }
            if self.open.len() >= MAX_DEPTH {
                return Err(ArgfileError::TooDeep {
                    path: file.to_path_buf(),
                    line,
                    target: path,
                });
            }
        }
        let text = std::fs::read_to_string(&path).map_err(read_error)?;
        self.open.push(canonical);
        let result = self.lines(&path, &text);
        self.open.pop();
        result
    }

    fn lines(&mut self, path: &Path, text: &str) -> Result<(), ArgfileError> {
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if self.after_dash_dash {
                // After `--` every line is one plain (positional) argument.
                self.out.push(line.into());
                continue;
            }
            if let Some(name) = argfile_path(line) {
                let name = unquote(name.trim(), path, n)?;
                self.file(name, Some((path, n)))?;
                continue;
            }
            if !line.starts_with('-') {
                return Err(ArgfileError::NotAFlag {
                    path: path.to_path_buf(),
                    line: n,
                    text: line.to_string(),
                });
            }
            let (flag, value) = match line.find(char::is_whitespace) {
                Some(at) => (&line[..at], Some(line[at..].trim_start())),
                None => (line, None),
            };
            if flag.contains('=') {
                if let Some((name, inline)) = line.split_once('=') {
                    // `--flag=value`: one argument, even when the value has spaces.
                    let value = unquote(inline, path, n)?;
                    self.out.push(format!("{name}={value}").into());
                    continue;
                }
            }
            if flag == "--" {
                self.after_dash_dash = true;
            }
            self.out.push(flag.into());
            if let Some(value) = value {
                self.out.push(unquote(value, path, n)?.into());
            }
        }
        Ok(())
    }
}

/// `value` without its wrapping double quotes, if it has them.
fn unquote<'v>(value: &'v str, path: &Path, line: usize) -> Result<&'v str, ArgfileError> {
    match value.strip_prefix('"') {
        None => Ok(value),
        Some(rest) => rest
            .strip_suffix('"')
            .ok_or_else(|| ArgfileError::UnclosedQuote {
                path: path.to_path_buf(),
                line,
                text: value.to_string(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn expands_in_place_and_keeps_the_program_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "s.flags", "--mesh mesh.toml\n--verbose\n");
        let got = expand(args(&[
            &format!("@{f}"),
            "sidecar",
            &format!("@{f}"),
            "--x",
        ]))
        .unwrap();
        let want = [
            &format!("@{f}"),
            "sidecar",
            "--mesh",
            "mesh.toml",
            "--verbose",
            "--x",
        ];
        assert_eq!(got, args(&want));
        assert!(expand(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn relative_paths_start_at_the_base_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.flags", "--a 1\n@b.flags\n");
        write(dir.path(), "b.flags", "--b 2\n");
        let got = expand_from(args(&["weft", "@a.flags"]), dir.path()).unwrap();
        assert_eq!(got, args(&["weft", "--a", "1", "--b", "2"]));
    }

    #[test]
    fn skips_blank_lines_and_comments_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            "# a comment\n\n   \n   --a   x  \r\n\t# indented comment\n--b # not a comment\n";
        let f = write(dir.path(), "f", text);
        let got = expand(args(&["weft", &format!("@{f}")])).unwrap();
        assert_eq!(got, args(&["weft", "--a", "x", "--b", "# not a comment"]));
    }

    #[test]
    fn splits_at_the_first_whitespace_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "f", "--name \t value  with spaces\n-v\n");
        let got = expand(args(&["weft", &format!("@{f}")])).unwrap();
        assert_eq!(got, args(&["weft", "--name", "value  with spaces", "-v"]));
    }

    #[test]
    fn flag_equals_value_stays_one_argument() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "f", "--a=1\n--b=x y\n--c=\"q r\"\n");
        let got = expand(args(&["weft", &format!("@{f}")])).unwrap();
        assert_eq!(got, args(&["weft", "--a=1", "--b=x y", "--c=q r"]));
    }

    #[test]
    fn double_quotes_around_values_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "f", "--a \"x y\"\n--b \"\"\n--c say \"hi\"\n");
        let got = expand(args(&["weft", &format!("@{f}")])).unwrap();
        assert_eq!(
            got,
            args(&["weft", "--a", "x y", "--b", "", "--c", "say \"hi\""])
        );
        let bad = write(dir.path(), "bad", "--a 1\n--b \"open\n");
        let err = expand(args(&["weft", &format!("@{bad}")])).unwrap_err();
        assert!(
            matches!(err, ArgfileError::UnclosedQuote { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_line_that_is_not_a_flag_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "f", "--a 1\n\nmesh.toml\n");
        let err = expand(args(&["weft", &format!("@{f}")])).unwrap_err();
        assert!(
            matches!(err, ArgfileError::NotAFlag { line: 3, .. }),
            "{err:?}"
        );
        let shown = err.to_string();
        assert!(shown.contains(&f), "{shown}");
        assert!(
            shown.contains("line 3: expected a flag like --mesh FILE"),
            "{shown}"
        );
    }

    #[test]
    fn nested_files_expand_up_to_the_depth_limit() {
        let dir = tempfile::tempdir().unwrap();
        // f1 includes f2 … includes f{n}; f{n} holds --last.
        let chain = |n: usize| {
            for i in 1..n {
                write(
                    dir.path(),
                    &format!("f{i}"),
                    &format!("--d{i}\n@f{}\n", i + 1),
                );
            }
            write(dir.path(), &format!("f{n}"), "--last\n");
            expand_from(args(&["weft", "@f1"]), dir.path())
        };
        let got = chain(MAX_DEPTH).unwrap();
        assert_eq!(got.len(), 1 + MAX_DEPTH);
        assert_eq!(got.last().unwrap(), "--last");
        let err = chain(MAX_DEPTH + 1).unwrap_err();
        assert!(
            matches!(&err, ArgfileError::TooDeep { line: 2, target, .. } if target.ends_with("f9")),
            "{err:?}"
        );
    }

    #[test]
    fn cycles_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a", "--a\n@b\n");
        write(dir.path(), "b", "--b\n\n@\"a\"\n");
        let err = expand_from(args(&["weft", "@a"]), dir.path()).unwrap_err();
        assert!(
            matches!(&err, ArgfileError::Cycle { path, line: 3, .. } if path.ends_with("b")),
            "{err:?}"
        );
        write(dir.path(), "self", "@self\n");
        let err = expand_from(args(&["weft", "@self"]), dir.path()).unwrap_err();
        assert!(
            matches!(err, ArgfileError::Cycle { line: 1, .. }),
            "{err:?}"
        );
        // The same file twice side by side is not a cycle.
        write(dir.path(), "twice", "@b2\n@b2\n");
        write(dir.path(), "b2", "--b\n");
        let got = expand_from(args(&["weft", "@twice"]), dir.path()).unwrap();
        assert_eq!(got, args(&["weft", "--b", "--b"]));
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.flags");
        let err = expand(args(&["weft", &format!("@{}", missing.display())])).unwrap_err();
        let shown = err.to_string();
        assert!(
            matches!(err, ArgfileError::Read { from: None, .. }),
            "{err:?}"
        );
        assert!(shown.contains(&missing.display().to_string()), "{shown}");
        // Nested: the error also says where the missing file was named.
        write(dir.path(), "outer", "--a\n@nope.flags\n");
        let err = expand_from(args(&["weft", "@outer"]), dir.path()).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("nope.flags"), "{shown}");
        assert!(shown.contains("outer, line 2"), "{shown}");
    }

    #[test]
    fn nothing_after_dash_dash_is_expanded() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "f", "--a\n");
        let at = format!("@{f}");
        let got = expand(args(&["weft", &at, "--", &at, "@"])).unwrap();
        assert_eq!(got, args(&["weft", "--a", "--", &at, "@"]));
        // A `--` line in a file ends expansion too.
        let g = write(dir.path(), "g", "--\n@f\n");
        let got = expand(args(&["weft", &format!("@{g}"), &at])).unwrap();
        assert_eq!(got, args(&["weft", "--", "@f", &at]));
    }

    #[test]
    fn a_lone_at_sign_is_a_plain_argument() {
        assert_eq!(expand(args(&["weft", "@"])).unwrap(), args(&["weft", "@"]));
    }
}

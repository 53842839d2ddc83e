//! `comb apply -f` / `comb delete -f`: validate, then change the manifests directory the
//! agents read. Nothing is written unless the whole directory would still be valid.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use comb_config::{ConfigErrors, Document, Object};
use comb_lab::Lab;

#[derive(Clone, Debug, clap::Args)]
pub struct FileArgs {
    /// Manifest file (multi-document YAML).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// The manifests directory to change (default: the running lab's).
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// The lab whose manifests directory to change, when several run.
    #[arg(long)]
    pub lab: Option<String>,
}

fn target_dir(a: &FileArgs) -> Result<PathBuf> {
    if let Some(d) = &a.manifests {
        return Ok(d.clone());
    }
    let name = match &a.lab {
        Some(n) => n.clone(),
        None => {
            let labs = Lab::list()?;
            match labs.as_slice() {
                [one] => one.clone(),
                [] => bail!("no lab is running; pass --manifests DIR (the directory combd reads)"),
                many => bail!(
                    "several labs are running ({}); pick one with --lab",
                    many.join(", ")
                ),
            }
        }
    };
    Ok(Lab::open(&name)?.manifests_dir())
}

/// (kind, namespace, name) of an object: what apply replaces and delete removes.
pub fn object_key(o: &Object) -> (String, String, String) {
    let m = o.metadata();
    let ns = match o.is_namespaced() {
        true => m.namespace.clone().unwrap_or_else(|| "default".into()),
        false => String::new(),
    };
    (o.kind().to_string(), ns, m.name.clone().unwrap_or_default())
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    comb_config::manifest_files(dir)
        .with_context(|| format!("reading manifests directory {}", dir.display()))
}

fn report(errors: &ConfigErrors) -> ExitCode {
    for e in &errors.0 {
        eprintln!("error: {e}");
    }
    eprintln!("nothing was changed");
    ExitCode::FAILURE
}

/// Write a file so that a reader sees either the old or the new content, never half.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().context("file has no directory")?;
    let tmp = tempfile::Builder::new()
        .prefix(".comb-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    std::fs::write(tmp.path(), text)?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn parse_existing(files: &[PathBuf], skip: Option<&Path>) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for f in files.iter().filter(|f| Some(f.as_path()) != skip) {
        let text = std::fs::read_to_string(f)?;
        match comb_config::parse_file_text(f, &text) {
            Ok(d) => docs.extend(d),
            // A broken file already in the directory is the agent's to report; apply
            // judges what it adds against the rest.
            Err(e) => eprintln!(
                "warning: {} is invalid and was left out of validation: {e}",
                f.display()
            ),
        }
    }
    Ok(docs)
}

pub fn apply(a: &FileArgs) -> Result<ExitCode> {
    let dir = target_dir(a)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let new_docs = match comb_config::parse_file_text(&a.file, &text) {
        Ok(d) => d,
        Err(e) => return Ok(report(&e)),
    };
    let dest = dir.join(a.file.file_name().context("file has no name")?);
    let mut all = parse_existing(&yaml_files(&dir)?, Some(&dest))?;
    all.extend(new_docs.iter().cloned());
    if let Err(e) = comb_config::build_snapshot(&all) {
        return Ok(report(&e));
    }
    write_atomic(&dest, &text)?;
    for d in &new_docs {
        let (kind, ns, name) = object_key(&d.object);
        let full = if ns.is_empty() {
            name
        } else {
            format!("{ns}/{name}")
        };
        println!("{} {full} configured", kind.to_lowercase());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn delete(a: &FileArgs) -> Result<ExitCode> {
    let dir = target_dir(a)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let gone: BTreeSet<_> = match comb_config::parse_file_text(&a.file, &text) {
        Ok(d) => d.iter().map(|d| object_key(&d.object)).collect(),
        Err(e) => return Ok(report(&e)),
    };
    let files = yaml_files(&dir)?;
    let mut rewrites: Vec<(PathBuf, Vec<Object>)> = Vec::new();
    let mut kept_all = Vec::new();
    let mut found = BTreeSet::new();
    for f in &files {
        let Ok(docs) = comb_config::parse_file_text(f, &std::fs::read_to_string(f)?) else {
            continue;
        };
        let before = docs.len();
        let kept: Vec<Document> = docs
            .into_iter()
            .filter(|d| {
                let k = object_key(&d.object);
                let hit = gone.contains(&k);
                if hit {
                    found.insert(k);
                }
                !hit
            })
            .collect();
        if kept.len() != before {
            rewrites.push((f.clone(), kept.iter().map(|d| d.object.clone()).collect()));
        }
        kept_all.extend(kept);
    }
    if let Err(e) = comb_config::build_snapshot(&kept_all) {
        return Ok(report(&e));
    }
    for (f, objs) in rewrites {
        if objs.is_empty() {
            std::fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
        } else {
            write_atomic(&f, &comb_config::to_yaml_documents(&objs))?;
        }
    }
    let mut code = ExitCode::SUCCESS;
    for k in &gone {
        let full = if k.1.is_empty() {
            k.2.clone()
        } else {
            format!("{}/{}", k.1, k.2)
        };
        if found.contains(k) {
            println!("{} {full} deleted", k.0.to_lowercase());
        } else {
            eprintln!(
                "error: {} {full} not found in {}",
                k.0.to_lowercase(),
                dir.display()
            );
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

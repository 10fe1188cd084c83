//! Plans generated fleets and reports how long `ferry plan` takes.
//!
//! `cargo build --release && cargo run --release --example bench_plan -- [IMAGES...]`
//! (default 500). Each fleet has images with 0–3 random earlier parents (FROM one, COPY --from
//! others), several stages, build args and tags in three environments.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// A small deterministic generator, so every run plans the same fleet.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn generate(dir: &Path, images: usize) {
    let mut rng = Lcg(42);
    let mut toml = String::from(
        "[project]\nname = \"bench\"\n\n[environments.dev]\nregistry = \"localhost:5000/dev\"\ntags = [\"{version}-dev.{git_short}\", \"dev\"]\n\n[environments.prod]\nregistry = \"registry.example.com/prod\"\ntags = [\"{version}\", \"{major}.{minor}\", \"latest\"]\n\n",
    );
    for i in 0..images {
        let ctx = dir.join(format!("img{i:04}"));
        std::fs::create_dir_all(&ctx).expect("create context");
        let mut df = String::from("ARG TAG=latest\n");
        let parents = if i == 0 { 0 } else { rng.below(4) as usize };
        let mut picked: Vec<usize> = (0..parents).map(|_| rng.below(i as u64) as usize).collect();
        picked.sort();
        picked.dedup();
        match picked.first() {
            Some(p) => df.push_str(&format!("FROM bench/img{p:04}:${{TAG}} AS build\n")),
            None => df.push_str("FROM scratch AS build\n"),
        }
        df.push_str("COPY . /src\nRUN echo build\n");
        for p in picked.iter().skip(1) {
            df.push_str(&format!("COPY --from=img{p:04} /app /deps/{p}\n"));
        }
        df.push_str("\nFROM build AS final\nENV A=1\nCMD [\"/app\"]\n");
        std::fs::write(ctx.join("Dockerfile"), df).expect("write Dockerfile");
        toml.push_str(&format!(
            "[images.img{i:04}]\ncontext = \"img{i:04}\"\nversion = \"1.{}.{}\"\n\n",
            rng.below(10),
            rng.below(10)
        ));
    }
    std::fs::write(dir.join("images.toml"), toml).expect("write images.toml");
}

fn ferry_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/bench_plan → target/<profile>/ferry
    exe.parent().and_then(Path::parent).map(|p| p.join("ferry")).expect("target dir")
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![500] } else { sizes };
    let ferry = ferry_binary();
    assert!(ferry.exists(), "build the binary first: cargo build --release");
    for n in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        generate(dir.path(), n);
        let mut times = Vec::new();
        for _ in 0..7 {
            let start = Instant::now();
            let out = Command::new(&ferry)
                .args(["plan", "--json"])
                .current_dir(dir.path())
                .output()
                .expect("run ferry");
            times.push(start.elapsed().as_secs_f64());
            assert!(
                out.status.success(),
                "ferry plan failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        times.sort_by(f64::total_cmp);
        println!(
            "plan of {n} generated images: median {:.1} ms, min {:.1} ms, max {:.1} ms (7 runs)",
            times[3] * 1000.0,
            times[0] * 1000.0,
            times[6] * 1000.0
        );
    }
}

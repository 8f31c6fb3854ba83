//! Prints the boot bundle for a cache dir and agent: `cargo run -p hutch-guest --example bundle CACHE AGENT`.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let cache = std::path::Path::new(&a[1]);
    let k = hutch_guest::fetch_distro_kernel(cache, "linux-image-cloud-amd64").unwrap();
    let b = hutch_guest::ensure_bundle(cache, &k, std::path::Path::new(&a[2])).unwrap();
    println!("{} {}", b.kernel.display(), b.initrd.display());
}

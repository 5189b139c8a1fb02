//! The pass-through of `passthrough.rs` on jemalloc (with the proxy's options: background
//! threads, a 64 KiB thread cache), to measure what the allocator alone is worth to bare
//! Pingora (`bash benches/load.sh knobs`).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: Option<&'static u8> = Some(&meraki_oauth_proxy::JEMALLOC_CONF[0]);

#[path = "passthrough.rs"]
mod passthrough;

fn main() {
    passthrough::main()
}

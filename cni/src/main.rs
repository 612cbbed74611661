//! `shoal-cni`: see the library's documentation (lib.rs) for the protocol and codes.

use std::io::{Read as _, Write as _};

fn main() {
    let mut stdin = vec![];
    let read = std::io::stdin().read_to_end(&mut stdin);
    let call = shoal_cni::Call {
        env: std::env::vars().collect(),
        stdin,
    };
    let (version, out) = match read {
        Err(e) => (
            shoal_cni::FALLBACK_VERSION.to_string(),
            Err(shoal_cni::CniError::new(
                shoal_cni::DECODE,
                format!("reading stdin: {e}"),
            )),
        ),
        Ok(_) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(shoal_cni::run(&call))
        }
    };
    let mut stdout = std::io::stdout().lock();
    match out {
        Ok(Some(v)) => {
            let _ = writeln!(stdout, "{v}");
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            let _ = stdout.flush();
            std::process::exit(1);
        }
    }
}

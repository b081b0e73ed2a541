//! Writes the IngestDrain CRD as YAML to stdout (`crds/` holds its output).

use ingest_operator::crd::IngestDrain;
use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    let crd = serde_json::to_value(IngestDrain::crd())?;
    print!("{}", ingest_operator::yaml::to_yaml(&crd));
    Ok(())
}

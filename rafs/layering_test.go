package rafs

import (
	"os/exec"
	"strings"
	"testing"
)

// rafs is the format: it describes and imports nothing above it (the
// device composer, the blob engine, conversion, the CLI).
func TestImportsNothingAbove(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	const mod = "github.com/rafsnbd/rafsnbd/"
	for _, dep := range strings.Fields(string(out)) {
		for _, above := range []string{"blockdev", "blobcache", "oci", "nbd", "cmd", "fusedev", "mounter"} {
			if dep == mod+above || strings.HasPrefix(dep, mod+above+"/") {
				t.Errorf("rafs depends on %s", dep)
			}
		}
	}
}

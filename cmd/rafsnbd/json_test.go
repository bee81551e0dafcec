package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// decodeJSON runs a command line that prints JSON and decodes it, checking
// that nothing else is on stdout and that every key is snake_case.
func decodeJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	code, stdout, stderr := runLine(t, append([]string{"--log-level", "error"}, args...)...)
	if code != 0 {
		t.Fatalf("%q: exit %d: %s", args, code, stderr)
	}
	dec := json.NewDecoder(strings.NewReader(stdout))
	var raw map[string]any
	if err := dec.Decode(&raw); err != nil || dec.More() {
		t.Fatalf("%q: stdout is not one JSON document (%v):\n%s", args, err, stdout)
	}
	snake := regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	var walk func(any)
	walk = func(x any) {
		switch x := x.(type) {
		case map[string]any:
			for k, e := range x {
				if !snake.MatchString(k) {
					t.Errorf("%q: key %q is not snake_case", args, k)
				}
				walk(e)
			}
		case []any:
			for _, e := range x {
				walk(e)
			}
		}
	}
	walk(raw)
	if err := json.Unmarshal([]byte(stdout), v); err != nil {
		t.Fatal(err)
	}
}

func TestExportJSON(t *testing.T) {
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	disk := filepath.Join(t.TempDir(), "x.disk")
	var r exportJSON
	decodeJSON(t, &r, "export", "-B", boot, "-D", filepath.Dir(boot), "-o", disk, "--verity", "--json")
	st, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if r.Disk != disk || r.Bytes != st.Size() || r.DeviceBytes == 0 || r.BlockSize == 0 || r.Verity == nil ||
		len(r.Verity.RootHash) != 64 || !strings.HasPrefix(r.Verity.Options, "dm-verity options: ") ||
		!strings.HasSuffix(r.Verity.Options, r.Verity.RootHash) || r.Verity.HashOffset == 0 {
		t.Errorf("export --json: %+v %+v", r, r.Verity)
	}
}

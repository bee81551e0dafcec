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

func TestCreateAndVerityJSON(t *testing.T) {
	w := t.TempDir()
	src := filepath.Join(w, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "f"), []byte(strings.Repeat("x", 100000)), 0o644); err != nil {
		t.Fatal(err)
	}
	var cr struct {
		Bootstrap string `json:"bootstrap"`
		Bytes     int64  `json:"bytes"`
		Inodes    uint64 `json:"inodes"`
		Blobs     []struct {
			ID     string `json:"id"`
			Path   string `json:"path"`
			Bytes  int64  `json:"bytes"`
			Chunks uint32 `json:"chunks"`
		} `json:"blobs"`
	}
	boot := filepath.Join(w, "x.boot")
	decodeJSON(t, &cr, "create", "-B", boot, "-D", filepath.Join(w, "blobs"), src, "--json")
	if cr.Bootstrap != boot || cr.Bytes == 0 || cr.Inodes != 2 || len(cr.Blobs) != 1 || len(cr.Blobs[0].ID) != 64 ||
		cr.Blobs[0].Chunks != 1 || cr.Blobs[0].Path != filepath.Join(w, "blobs", cr.Blobs[0].ID) {
		t.Errorf("create --json: %+v", cr)
	}

	data := filepath.Join(w, "data")
	if err := os.WriteFile(data, make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	var f, v verityJSON
	decodeJSON(t, &f, "verity", "format", data, "--json")
	if len(f.RootHash) != 64 || f.DataBlocks != 16 || f.HashOffset != 64<<10 || !strings.HasSuffix(f.Options, f.RootHash) {
		t.Errorf("verity format --json: %+v", f)
	}
	decodeJSON(t, &v, "verity", "verify", data, "--data-blocks", "16", f.RootHash, "--json")
	if v.RootHash != f.RootHash || v.DataBlocks != 16 || v.HashBlocks != f.HashBlocks {
		t.Errorf("verity verify --json: %+v, format said %+v", v, f)
	}
}

// Durations in log lines carry their unit, in text and JSON alike.
func TestLogDurationsHaveUnits(t *testing.T) {
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	for _, format := range []string{"--log-json", "--log-level=info"} {
		disk := filepath.Join(t.TempDir(), "x.disk")
		code, _, stderr := runLine(t, format, "export", "-B", boot, "-D", filepath.Dir(boot), "-o", disk)
		m := regexp.MustCompile(`"?took"?[=:]"?([0-9.]+)([a-zµ]*)`).FindStringSubmatch(stderr)
		if code != 0 || m == nil || m[2] == "" {
			t.Errorf("%s: exit %d, took %q in:\n%s", format, code, m, stderr)
		}
	}
}

// --quiet drops log lines (and bars); the result still goes to stdout.
func TestQuiet(t *testing.T) {
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	disk := filepath.Join(t.TempDir(), "x.disk")
	code, stdout, stderr := runLine(t, "--quiet", "export", "-B", boot, "-D", filepath.Dir(boot), "-o", disk, "--verity")
	if code != 0 || stderr != "" || !strings.HasPrefix(stdout, "dm-verity options: ") {
		t.Errorf("export --quiet: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if code, _, stderr = runLine(t, "export", "-B", boot, "-D", filepath.Dir(boot), "-o", disk, "--verity"); code != 0 || stderr == "" {
		t.Errorf("without --quiet, export logged nothing (%q): the test proves nothing", stderr)
	}
}

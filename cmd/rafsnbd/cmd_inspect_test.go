package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

func TestInspectJSONFixture22(t *testing.T) {
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	out, err := runCmd(t, "inspect", "--json", "--tree", boot)
	if err != nil {
		t.Fatal(err)
	}
	// Field names are an interface for scripts: check them literally.
	for _, want := range []string{
		`"magic": "0xe0f5e1e2"`,
		`"block_size": 4096`,
		`"root_nid": 128`,
		`"inos": 3`,
		`"meta_blkaddr": 2`,
		`"feature_incompat_names": [
      "CHUNKED_FILE",
      "DEVICE_TABLE"
    ]`,
		`"flag_names": [
      "HASH_BLAKE3",
      "EXPLICIT_UID_GID",
      "COMPRESSION_ZSTD",
      "INLINED_CHUNK_DIGEST"
    ]`,
		`"compressor": "zstd"`,
		`"chunk_size": 1048576`,
		`"chunk_table_entries": 2`,
		`"id": "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"`,
		`"chunk_count": 2`,
		`"compressed_size": 14554`,
		`"uncompressed_size": 36864`,
		`"feature_names": [
        "ALIGNED",
        "INLINED_CHUNK_DIGEST",
        "HAS_TAR_HEADER",
        "HAS_TOC",
        "CAP_TAR_TOC"
      ]`,
		`"mapped_blkaddr": 512`,
		`"blocks": 9`,
		`"ci_offset": 8314`,
		`"toc_digest": "cfc89ed0`,
		`"regular_files": 2`,
		`"directories": 1`,
		`"chunks": 2`,
		`"path": "/lib.rs"`,
		`"mode": "-rw-r--r--"`,
		`"mtime": "2023-02-19T15:12:33.628661334Z"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("JSON lacks %s", want)
		}
	}
	var r inspectReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	if len(r.Tree) != 3 || r.Tree[2].Path != "/sync_io.rs" || r.Tree[2].Size != 13400 || r.Tree[0].Mode != "drwxr-xr-x" {
		t.Errorf("tree %+v", r.Tree)
	}
}

func TestInspectSnapshotterFixture(t *testing.T) {
	boot := testutil.NydusFixture(t, "snapshotter-v6-bootstrap-chunk-pos-438272.boot")
	out, err := runCmd(t, "inspect", "--json", boot)
	if err != nil {
		t.Fatal(err)
	}
	var r inspectReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	c := r.Counts
	if c.Paths != 3517 || c.Inodes != 3517 || c.Directories != 678 || c.RegularFiles != 2627 || c.Symlinks != 212 || c.HardLinks != 0 {
		t.Errorf("counts %+v", c)
	}
	if r.Tree != nil {
		t.Error("tree printed without --tree")
	}
	for _, want := range []string{`"prefetch": [
      142
    ]`, `"compressor": "lz4_block"`, `"mapped_blkaddr": 0`, `"blocks": 20451`, `"flag_names": [
      "COMPRESSION_LZ4",
      "HASH_BLAKE3"
    ]`} {
		if !strings.Contains(out, want) {
			t.Errorf("JSON lacks %s", want)
		}
	}
	text, err := runCmd(t, "inspect", "--tree", boot)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"  directories         678\n",
		"  regular files       2627, holding 81619065 bytes (77.8 MiB)\n",
		"  symlinks            212\n",
		"  prefetch table      offset 4352, 1 inodes: [142]\n",
		"  mapped blkaddr      0 (not set: this image cannot be exported as a flat block device)\n",
		"Blob 0                cdde6f5645daea414d60bc75611102a8bc8dae6198f087366365d6ff85bf5726\n",
		" /usr/bin/bash\n",
		" /bin -> usr/bin\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("text output lacks %q", want)
		}
	}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasSuffix(line, " ") {
			t.Errorf("trailing space in %q", line)
			break
		}
	}
}

func TestInspectErrors(t *testing.T) {
	if _, err := runCmd(t, "inspect"); err == nil || !strings.Contains(err.Error(), "one BOOTSTRAP") {
		t.Errorf("no argument: %v", err)
	}
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	b, err := os.ReadFile(boot)
	if err != nil {
		t.Fatal(err)
	}
	b[1024] ^= 1 // superblock magic
	bad := filepath.Join(t.TempDir(), "bad.boot")
	if err := os.WriteFile(bad, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = runCmd(t, "inspect", bad)
	if err == nil || !strings.Contains(err.Error(), "superblock field magic at offset 0x400") {
		t.Errorf("corrupt bootstrap: %v", err)
	}
}

func TestLsMode(t *testing.T) {
	for mode, want := range map[uint16]string{
		0o040755: "drwxr-xr-x", 0o100644: "-rw-r--r--", 0o104755: "-rwsr-xr-x", 0o102700: "-rwx--S---", 0o102710: "-rwx--s---",
		0o041777: "drwxrwxrwt", 0o041776: "drwxrwxrwT", 0o120777: "lrwxrwxrwx", 0o020666: "crw-rw-rw-",
		0o060660: "brw-rw----", 0o010644: "prw-r--r--", 0o140755: "srwxr-xr-x",
	} {
		if got := lsMode(mode); got != want {
			t.Errorf("lsMode(%#o) = %s, want %s", mode, got, want)
		}
	}
}

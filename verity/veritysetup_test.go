package verity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// These tests take veritysetup (cryptsetup-bin) as the judge: our root and
// hash area must equal what `veritysetup format` writes, `veritysetup
// verify` must accept our tree, and both must reject the same corruption
// at the same position.

type vsResult struct {
	stdout, stderr string
	rc             int
}

func veritysetup(t *testing.T, args ...string) vsResult {
	t.Helper()
	cmd := exec.Command("veritysetup", args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	res := vsResult{stdout: out.String(), stderr: errb.String()}
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		res.rc = exit.ExitCode()
	default:
		t.Fatalf("veritysetup %v: %v", args, err)
	}
	return res
}

var rootLine = regexp.MustCompile(`(?m)^Root hash:\s+([0-9a-f]+)\s*$`)

// veritysetupFormat runs `veritysetup format` and returns the root hash.
func veritysetupFormat(t *testing.T, p Params, data, hashFile string) string {
	t.Helper()
	args := append([]string{"format"}, p.VeritysetupArgs()...)
	res := veritysetup(t, append(args, data, hashFile)...)
	if res.rc != 0 {
		t.Fatalf("veritysetup format: rc=%d\n%s%s", res.rc, res.stdout, res.stderr)
	}
	m := rootLine.FindStringSubmatch(res.stdout)
	if m == nil {
		t.Fatalf("veritysetup format printed no root hash:\n%s", res.stdout)
	}
	return m[1]
}

var failPosition = regexp.MustCompile(`(Verification failed|Spare area is not zeroed) at position (\d+)\.`)

// veritysetupVerify runs `veritysetup verify` and returns its exit code
// and the position it reports, or -1 when it reports none.
func veritysetupVerify(t *testing.T, p Params, data, hashFile, root string) (int, int64, string) {
	t.Helper()
	args := append([]string{"verify"}, p.VeritysetupArgs()...)
	res := veritysetup(t, append(args, data, hashFile, root)...)
	pos := int64(-1)
	if m := failPosition.FindStringSubmatch(res.stderr); m != nil {
		pos, _ = strconv.ParseInt(m[2], 10, 64)
	}
	return res.rc, pos, res.stderr
}

func randomBytes(seed uint64, n int) []byte {
	rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), 1})
	b := make([]byte, n)
	rng.Read(b)
	return b
}

// withHoles zeroes some runs of blocks, as holes in a disk image are, so
// that the all-zero shortcut is judged too.
func withHoles(data []byte, blockSize int) []byte {
	blocks := len(data) / blockSize
	for i := 1; i < blocks; i += 7 {
		end := min(i+1+i%5, blocks-1)
		clear(data[i*blockSize : end*blockSize])
	}
	return data
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func buildInMemory(t *testing.T, p Params, data []byte) *Tree {
	t.Helper()
	tree, err := Build(context.Background(), bytes.NewReader(data), p, nil)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if uint64(len(tree.HashArea)) != p.TreeSize() {
		t.Fatalf("hash area has %d bytes, TreeSize says %d", len(tree.HashArea), p.TreeSize())
	}
	return tree
}

func TestMatchesVeritysetup(t *testing.T) {
	testutil.RequireTool(t, "veritysetup")
	salt := randomBytes(99, 32)
	for _, dbs := range []int{512, 4096} {
		few := (3<<20)/dbs + 5 // a few MiB, not a round number of hash blocks
		for _, blocks := range []uint64{1, 2, 127, 128, 129, 128*128 + 1, uint64(few)} {
			for _, s := range [][]byte{nil, salt} {
				name := fmt.Sprintf("dbs=%d/blocks=%d/salt=%d", dbs, blocks, len(s))
				t.Run(name, func(t *testing.T) {
					if blocks*uint64(dbs) > 16<<20 {
						testutil.SkipShort(t)
					}
					p := Params{Algorithm: "sha256", DataBlockSize: dbs, HashBlockSize: 4096, DataBlocks: blocks, Salt: s}
					checkAgainstVeritysetup(t, p, withHoles(randomBytes(blocks*uint64(dbs)+uint64(len(s)), int(p.DataSize())), dbs))
				})
			}
		}
	}
}

// TestMatchesVeritysetupVariants covers the other hash functions and block
// sizes veritysetup takes.
func TestMatchesVeritysetupVariants(t *testing.T) {
	testutil.RequireTool(t, "veritysetup")
	for i, p := range []Params{
		{Algorithm: "sha1", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 300},
		{Algorithm: "sha1", DataBlockSize: 512, HashBlockSize: 4096, DataBlocks: 16500, Salt: []byte("nacl")},
		{Algorithm: "sha512", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 4097, Salt: randomBytes(7, 64)},
		{Algorithm: "sha512", DataBlockSize: 512, HashBlockSize: 512, DataBlocks: 70},
		{Algorithm: "sha256", DataBlockSize: 1024, HashBlockSize: 1024, DataBlocks: 1000},
		{Algorithm: "sha256", DataBlockSize: 65536, HashBlockSize: 8192, DataBlocks: 300, Salt: randomBytes(8, 100)},
		{Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 65536, DataBlocks: 2049},
		// One level-1 block covers more than a batch: batches share blocks.
		{Algorithm: "sha256", DataBlockSize: 65536, HashBlockSize: 4096, DataBlocks: 1},
		{Algorithm: "sha1", DataBlockSize: 65536, HashBlockSize: 4096, DataBlocks: 300, Salt: []byte{9}},
		{Algorithm: "sha256", DataBlockSize: 512, HashBlockSize: 512, DataBlocks: 17 * 17 * 17, Salt: randomBytes(9, 256)},
	} {
		t.Run(fmt.Sprintf("%d-%s-dbs=%d-hbs=%d-blocks=%d-salt=%d", i, p.Algorithm, p.DataBlockSize, p.HashBlockSize, p.DataBlocks, len(p.Salt)), func(t *testing.T) {
			checkAgainstVeritysetup(t, p, randomBytes(uint64(i)+1000, int(p.DataSize())))
		})
	}
}

func checkAgainstVeritysetup(t *testing.T, p Params, data []byte) {
	dir := t.TempDir()
	dataFile := filepath.Join(dir, "data")
	refHash := filepath.Join(dir, "ref.hash")
	ourHash := filepath.Join(dir, "our.hash")
	writeFile(t, dataFile, data)

	refRoot := veritysetupFormat(t, p, dataFile, refHash)
	tree := buildInMemory(t, p, data)
	if got := tree.RootHex(); got != refRoot {
		t.Fatalf("root %s, veritysetup %s", got, refRoot)
	}
	ref, err := os.ReadFile(refHash)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tree.HashArea, ref) {
		t.Fatalf("hash area differs from veritysetup's at byte %d (ours %d bytes, theirs %d)",
			firstDifference(tree.HashArea, ref[:min(len(ref), len(tree.HashArea))]), len(tree.HashArea), len(ref))
	}
	writeFile(t, ourHash, tree.HashArea)
	if rc, _, stderr := veritysetupVerify(t, p, dataFile, ourHash, refRoot); rc != 0 {
		t.Fatalf("veritysetup verify rejects our tree: rc=%d %s", rc, stderr)
	}
	if err := Verify(context.Background(), bytes.NewReader(data), bytes.NewReader(tree.HashArea), p, tree.Root); err != nil {
		t.Fatalf("Verify of a good tree: %v", err)
	}

	rng := rand.New(rand.NewPCG(uint64(len(data)), uint64(len(p.Salt))))

	// One flipped data byte: both reject it, at the same block.
	bad := bytes.Clone(data)
	at := rng.IntN(len(bad))
	bad[at] ^= 0x40
	writeFile(t, dataFile, bad)
	rc, pos, stderr := veritysetupVerify(t, p, dataFile, ourHash, refRoot)
	if rc == 0 {
		t.Fatalf("veritysetup verify accepts data with byte %d flipped", at)
	}
	err = Verify(context.Background(), bytes.NewReader(bad), bytes.NewReader(tree.HashArea), p, tree.Root)
	checkCorruption(t, err, pos, stderr, fmt.Sprintf("data byte %d flipped", at))
	writeFile(t, dataFile, data)

	// One flipped tree byte.
	if len(tree.HashArea) == 0 {
		return
	}
	badTree := bytes.Clone(tree.HashArea)
	at = rng.IntN(len(badTree))
	badTree[at] ^= 0x01
	writeFile(t, ourHash, badTree)
	rc, pos, stderr = veritysetupVerify(t, p, dataFile, ourHash, refRoot)
	if rc == 0 {
		t.Fatalf("veritysetup verify accepts a tree with byte %d flipped", at)
	}
	err = Verify(context.Background(), bytes.NewReader(data), bytes.NewReader(badTree), p, tree.Root)
	checkCorruption(t, err, pos, stderr, fmt.Sprintf("tree byte %d flipped", at))
}

// checkCorruption wants a CorruptionError at the position veritysetup
// reported (or a root mismatch when it reported none).
func checkCorruption(t *testing.T, err error, vsPos int64, vsStderr, what string) {
	t.Helper()
	var ce *CorruptionError
	if !errors.As(err, &ce) {
		t.Fatalf("%s: Verify returned %v, want a CorruptionError", what, err)
	}
	if vsPos < 0 {
		if ce.Kind != BadRoot || !strings.Contains(vsStderr, "root hash") {
			t.Fatalf("%s: Verify says %v; veritysetup says %q", what, err, vsStderr)
		}
		return
	}
	if int64(ce.Offset) != vsPos || ce.Kind == BadRoot {
		t.Fatalf("%s: Verify says %v; veritysetup says %q", what, err, vsStderr)
	}
	if (ce.Kind == BadSpareArea) != strings.Contains(vsStderr, "Spare area") {
		t.Fatalf("%s: Verify says %v; veritysetup says %q", what, err, vsStderr)
	}
}

// TestAppendedTreeMatchesVeritysetup writes the tree into the data file
// itself, after a gap when the data does not end on a hash block.
func TestAppendedTreeMatchesVeritysetup(t *testing.T) {
	testutil.RequireTool(t, "veritysetup")
	for _, c := range []struct {
		dbs    int
		blocks uint64
	}{{512, 4633}, {4096, 1000}, {512, 129}} {
		t.Run(fmt.Sprintf("dbs=%d/blocks=%d", c.dbs, c.blocks), func(t *testing.T) {
			dir := t.TempDir()
			data := randomBytes(c.blocks, c.dbs*int(c.blocks))
			p := Params{Algorithm: "sha256", DataBlockSize: c.dbs, HashBlockSize: 4096, DataBlocks: c.blocks,
				HashOffset: AppendedHashOffset(uint64(len(data)), 4096)}
			ref := filepath.Join(dir, "ref.img")
			ours := filepath.Join(dir, "our.img")
			writeFile(t, ref, data)
			writeFile(t, ours, data)
			refRoot := veritysetupFormat(t, p, ref, ref)

			f, err := os.OpenFile(ours, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			tree, err := Build(context.Background(), f, p, f)
			if err != nil {
				t.Fatal(err)
			}
			if tree.HashArea != nil {
				t.Errorf("HashArea kept in memory although the tree went to a file")
			}
			if tree.RootHex() != refRoot {
				t.Fatalf("root %s, veritysetup %s", tree.RootHex(), refRoot)
			}
			a, _ := os.ReadFile(ref)
			b, _ := os.ReadFile(ours)
			if !bytes.Equal(a, b) {
				t.Fatalf("files differ (ours %d bytes, veritysetup %d) at byte %d", len(b), len(a), firstDifference(a[:min(len(a), len(b))], b))
			}
			if rc, _, stderr := veritysetupVerify(t, p, ours, ours, refRoot); rc != 0 {
				t.Fatalf("veritysetup verify: rc=%d %s", rc, stderr)
			}
			if err := Verify(context.Background(), f, f, p, tree.Root); err != nil {
				t.Fatalf("Verify: %v", err)
			}
		})
	}
}

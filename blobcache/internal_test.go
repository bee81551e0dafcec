package blobcache

import (
	"fmt"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

func TestMetaExtentsMerge(t *testing.T) {
	m := &metaReader{}
	m.add(100, []byte("abcdef")) // [100, 106)
	m.add(10, []byte("xyz"))     // [10, 13)
	m.add(104, []byte("EFGHIJ")) // overlaps the end: [100, 110)
	m.add(13, []byte("0123"))    // touches: [10, 17)
	m.add(101, []byte("b"))      // inside
	got := fmt.Sprintf("%d %d %s %d %s", len(m.extents), m.extents[0].off, m.extents[0].data, m.extents[1].off, m.extents[1].data)
	if want := "2 10 xyz0123 100 abcdEFGHIJ"; got != want {
		t.Errorf("extents %q, want %q", got, want)
	}
	p := make([]byte, 4)
	if n, err := m.ReadAt(p, 104); n != 4 || err != nil || string(p) != "EFGH" {
		t.Errorf("ReadAt = %d, %v, %q", n, err, p)
	}
	if _, err := m.ReadAt(p, 108); err == nil { // runs past the extent, no backend
		t.Error("read outside the recorded extents succeeded")
	}
	enc := m.encode([32]byte{1})
	path := t.TempDir() + "/m"
	if err := atomicfile.WriteFile(path, enc, 0o640); err != nil {
		t.Fatal(err)
	}
	exts, err := loadMeta(path, [32]byte{1})
	if err != nil || len(exts) != 2 || string(exts[1].data) != "abcdEFGHIJ" {
		t.Errorf("loadMeta = %v, %v", exts, err)
	}
	if _, err := loadMeta(path, [32]byte{2}); err == nil {
		t.Error("meta file of another blob entry accepted")
	}
}

func TestMergeRanges(t *testing.T) {
	got := mergeRanges([]Range{{100, 10}, {0, 5}, {5, 5}, {105, 20}, {200, 0}, {300, 1}})
	if want := "[{0 10} {100 25} {300 1}]"; fmt.Sprint(got) != want {
		t.Errorf("mergeRanges = %v, want %s", got, want)
	}
}

func TestGroup(t *testing.T) {
	b := &blob{opts: &Options{MaxFetchSize: 100, MergeGap: 10}, lay: &layout{units: []unit{
		{coff: 0, csize: 40}, {coff: 40, csize: 40}, {coff: 80, csize: 40}, // 3rd would exceed 100
		{coff: 125, csize: 10},  // gap 5 from 120: merged with the 3rd
		{coff: 200, csize: 10},  // gap 65: new request
		{coff: 210, csize: 500}, // alone larger than the bound: still one request
	}}}
	got := b.group([]uint32{5, 3, 1, 0, 2, 4})
	if want := "[[0 1] [2 3] [4] [5]]"; fmt.Sprint(got) != want {
		t.Errorf("group = %v, want %s", got, want)
	}
}

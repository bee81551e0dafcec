package blobcache

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"
	"sync"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

// The ready map file: a 4 KiB header, then one bit per unit (bit for unit
// i = byte i/8, mask 0x80>>(i%8), as nydus' chunk map). The header is
// written once, atomically, when the map is created; afterwards only
// bitmap bytes change, and only from 0 bits to 1 bits.
//
//	off  size  field
//	0    16    magic "rafsnbd-readymap"
//	16   4     version (1)
//	20   4     units
//	24   4     unit size (tarfs units; 0 for chunk units)
//	28   4     reserved, 0
//	32   8     uncompressed size of the blob
//	40   32    fingerprint: sha256 of what the cached bytes were checked against
const (
	mapHeaderSize = 4096
	mapVersion    = 1
)

var mapMagic = [16]byte([]byte("rafsnbd-readymap"))

type mapHeader struct {
	units       uint32
	unitSize    uint32
	size        uint64
	fingerprint [32]byte
}

func (h *mapHeader) encode() []byte {
	b := make([]byte, mapHeaderSize)
	copy(b, mapMagic[:])
	binary.LittleEndian.PutUint32(b[16:], mapVersion)
	binary.LittleEndian.PutUint32(b[20:], h.units)
	binary.LittleEndian.PutUint32(b[24:], h.unitSize)
	binary.LittleEndian.PutUint64(b[32:], h.size)
	copy(b[40:72], h.fingerprint[:])
	return b
}

func decodeMapHeader(b []byte) (mapHeader, error) {
	var h mapHeader
	if len(b) < mapHeaderSize {
		return h, fmt.Errorf("ready map header truncated (%d bytes)", len(b))
	}
	if !bytes.Equal(b[:16], mapMagic[:]) {
		return h, fmt.Errorf("ready map: bad magic %q", b[:16])
	}
	if v := binary.LittleEndian.Uint32(b[16:]); v != mapVersion {
		return h, fmt.Errorf("ready map: version %d, want %d", v, mapVersion)
	}
	h.units = binary.LittleEndian.Uint32(b[20:])
	h.unitSize = binary.LittleEndian.Uint32(b[24:])
	h.size = binary.LittleEndian.Uint64(b[32:])
	copy(h.fingerprint[:], b[40:72])
	return h, nil
}

func bitmapLen(units int) int { return (units + 7) / 8 }

// readMapFile reads and checks a whole ready map file.
func readMapFile(path string) (mapHeader, []byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return mapHeader{}, nil, err
	}
	h, err := decodeMapHeader(b)
	if err != nil {
		return h, nil, fmt.Errorf("%s: %w", path, err)
	}
	if want := mapHeaderSize + bitmapLen(int(h.units)); len(b) != want {
		return h, nil, fmt.Errorf("%s: %d bytes, want %d for %d units", path, len(b), want, h.units)
	}
	bm := b[mapHeaderSize:]
	if r := int(h.units) % 8; r != 0 && bm[len(bm)-1]&(0xFF>>r) != 0 {
		return h, nil, fmt.Errorf("%s: bits set past the last unit", path)
	}
	return h, bm, nil
}

func countBits(bm []byte, units int) int {
	n := 0
	for _, c := range bm[:min(len(bm), bitmapLen(units))] {
		n += bits.OnesCount8(c)
	}
	return n
}

func bitSet(bm []byte, i uint32) bool { return bm[i/8]&(0x80>>(i%8)) != 0 }

// readyMap is an open ready map file and its durable bits.
type readyMap struct {
	mu   sync.Mutex
	f    *os.File
	bits []byte // exactly what was written to the file
}

// createMap writes a fresh, all-clear map atomically and opens it.
func createMap(path string, h mapHeader) (*readyMap, error) {
	bm := make([]byte, bitmapLen(int(h.units)))
	if err := atomicfile.WriteFile(path, append(h.encode(), bm...), 0o640); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &readyMap{f: f, bits: bm}, nil
}

// openMap opens an existing map whose header must equal h.
func openMap(path string, h mapHeader) (*readyMap, error) {
	got, bm, err := readMapFile(path)
	if err != nil {
		return nil, err
	}
	if got != h {
		return nil, fmt.Errorf("%s: made for another blob layout or other digests", path)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &readyMap{f: f, bits: bm}, nil
}

// persist sets the bits of units, which must already be durable in the
// data file, and writes the changed bitmap bytes.
func (m *readyMap) persist(units []uint32) error {
	if len(units) == 0 {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	lo, hi := len(m.bits), -1
	for _, u := range units {
		m.bits[u/8] |= 0x80 >> (u % 8)
		lo, hi = min(lo, int(u/8)), max(hi, int(u/8))
	}
	_, err := m.f.WriteAt(m.bits[lo:hi+1], int64(mapHeaderSize+lo))
	return err
}

func (m *readyMap) sync() error { return m.f.Sync() }

func (m *readyMap) close() error { return m.f.Close() }

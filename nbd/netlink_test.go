package nbd

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/mdlayher/netlink"
)

// The numbers below are written out from <linux/nbd-netlink.h> (and the
// table in /work/shared/docs/nbd-kernel.md §2.3), not taken from our
// constants, so that a wrong constant fails here.
const (
	uapiAttrIndex           = 1
	uapiAttrSizeBytes       = 2
	uapiAttrBlockSizeBytes  = 3
	uapiAttrTimeout         = 4
	uapiAttrServerFlags     = 5
	uapiAttrSockets         = 7
	uapiAttrDeadConnTimeout = 8
	uapiAttrDeviceList      = 9
	uapiAttrBackendID       = 10
	uapiSockItem            = 1
	uapiSockFD              = 1
	uapiDeviceItem          = 1
	uapiDeviceIndex         = 1
	uapiDeviceConnected     = 2

	nlaFNested  = 1 << 15
	nlaTypeMask = ^uint16(nlaFNested | 1<<14)
)

// attrs parses b into a map of type → payload, failing on duplicates.
func attrs(t *testing.T, b []byte) map[uint16][]byte {
	t.Helper()
	list, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		t.Fatalf("attributes do not parse: %v", err)
	}
	m := make(map[uint16][]byte)
	for _, a := range list {
		typ := a.Type & nlaTypeMask
		if _, dup := m[typ]; dup {
			t.Fatalf("attribute %d appears twice", typ)
		}
		m[typ] = a.Data
	}
	return m
}

func wantU64(t *testing.T, m map[uint16][]byte, typ uint16, want uint64) {
	t.Helper()
	b, ok := m[typ]
	if !ok {
		t.Fatalf("attribute %d missing", typ)
	}
	if len(b) != 8 {
		t.Fatalf("attribute %d: %d bytes, want a u64", typ, len(b))
	}
	if got := binary.NativeEndian.Uint64(b); got != want {
		t.Errorf("attribute %d = %d, want %d", typ, got, want)
	}
}

func wantU32(t *testing.T, m map[uint16][]byte, typ uint16, want uint32) {
	t.Helper()
	b, ok := m[typ]
	if !ok {
		t.Fatalf("attribute %d missing", typ)
	}
	if len(b) != 4 {
		t.Fatalf("attribute %d: %d bytes, want a u32", typ, len(b))
	}
	if got := binary.NativeEndian.Uint32(b); got != want {
		t.Errorf("attribute %d = %d, want %d", typ, got, want)
	}
}

// socketFDs walks SOCKETS { SOCK_ITEM { SOCK_FD } ... } by hand.
func socketFDs(t *testing.T, raw []byte) []uint32 {
	t.Helper()
	items, err := netlink.UnmarshalAttributes(raw)
	if err != nil {
		t.Fatalf("sockets: %v", err)
	}
	var fds []uint32
	for _, item := range items {
		if item.Type&nlaTypeMask != uapiSockItem {
			t.Fatalf("sockets: item type %d, want %d", item.Type&nlaTypeMask, uapiSockItem)
		}
		inner := attrs(t, item.Data)
		b, ok := inner[uapiSockFD]
		if !ok || len(b) != 4 {
			t.Fatalf("sockets: item without a u32 SOCK_FD: %v", inner)
		}
		fds = append(fds, binary.NativeEndian.Uint32(b))
	}
	return fds
}

func TestNetlinkConnectLayout(t *testing.T) {
	req := nlConnectRequest{
		Index:           7,
		SizeBytes:       2347008,
		BlockSizeBytes:  4096,
		TimeoutSeconds:  30,
		DeadConnSeconds: 120,
		ServerFlags:     uint64(ReadOnlyFlags),
		BackendID:       "rafsnbd:disk:/img/plain.erofs",
		SocketFDs:       []int{11, 12, 13},
	}
	b, err := req.encode()
	if err != nil {
		t.Fatal(err)
	}
	m := attrs(t, b)
	wantU32(t, m, uapiAttrIndex, 7)
	wantU64(t, m, uapiAttrSizeBytes, 2347008)
	wantU64(t, m, uapiAttrBlockSizeBytes, 4096)
	wantU64(t, m, uapiAttrTimeout, 30)
	wantU64(t, m, uapiAttrDeadConnTimeout, 120)
	// HAS_FLAGS(bit 0) | READ_ONLY(1) | SEND_FLUSH(2) | CAN_MULTI_CONN(8).
	wantU64(t, m, uapiAttrServerFlags, 1|2|4|256)
	if got := m[uapiAttrBackendID]; !bytes.Equal(got, []byte("rafsnbd:disk:/img/plain.erofs\x00")) {
		t.Errorf("backend identifier = %q, want the NUL-terminated string", got)
	}
	fds := socketFDs(t, m[uapiAttrSockets])
	if len(fds) != 3 || fds[0] != 11 || fds[1] != 12 || fds[2] != 13 {
		t.Errorf("socket fds = %v, want [11 12 13] in order", fds)
	}
	if len(m) != 8 {
		t.Errorf("%d attributes, want exactly 8: %v", len(m), m)
	}
}

func TestNetlinkConnectLeavesIndexOutForAnyDevice(t *testing.T) {
	b, err := nlConnectRequest{Index: AnyDevice, SizeBytes: 4096, BlockSizeBytes: 512, ServerFlags: 3, SocketFDs: []int{5}}.encode()
	if err != nil {
		t.Fatal(err)
	}
	m := attrs(t, b)
	if _, ok := m[uapiAttrIndex]; ok {
		t.Error("INDEX present: current kernels reject -1, the attribute must be absent to let the kernel pick")
	}
	if _, ok := m[uapiAttrBackendID]; ok {
		t.Error("empty backend identifier encoded")
	}
	wantU64(t, m, uapiAttrBlockSizeBytes, 512)
	if fds := socketFDs(t, m[uapiAttrSockets]); len(fds) != 1 || fds[0] != 5 {
		t.Errorf("socket fds = %v, want [5]", fds)
	}
}

func TestNetlinkConnectNeedsSockets(t *testing.T) {
	if _, err := (nlConnectRequest{Index: AnyDevice, SizeBytes: 4096}).encode(); err == nil {
		t.Fatal("CONNECT without sockets encoded; the kernel requires NBD_ATTR_SOCKETS")
	}
}

// The nested flag is optional for the kernel's lenient parser but must not
// change the attribute type it sees.
func TestNetlinkSocketsAreNested(t *testing.T) {
	b, err := nlConnectRequest{Index: 0, SizeBytes: 4096, BlockSizeBytes: 4096, SocketFDs: []int{3}}.encode()
	if err != nil {
		t.Fatal(err)
	}
	list, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range list {
		if a.Type&nlaTypeMask == uapiAttrSockets && a.Type&nlaFNested == 0 {
			t.Errorf("SOCKETS attribute type %#x lacks NLA_F_NESTED", a.Type)
		}
	}
}

func TestNetlinkReconfigureLayout(t *testing.T) {
	b, err := nlReconfigureRequest{
		Index:           3,
		TimeoutSeconds:  0,
		DeadConnSeconds: 60,
		BackendID:       "id-1",
		SocketFDs:       []int{9, 10},
	}.encode()
	if err != nil {
		t.Fatal(err)
	}
	m := attrs(t, b)
	wantU32(t, m, uapiAttrIndex, 3)
	wantU64(t, m, uapiAttrTimeout, 0)
	wantU64(t, m, uapiAttrDeadConnTimeout, 60)
	if got := string(m[uapiAttrBackendID]); got != "id-1\x00" {
		t.Errorf("backend identifier = %q", got)
	}
	if fds := socketFDs(t, m[uapiAttrSockets]); len(fds) != 2 || fds[0] != 9 || fds[1] != 10 {
		t.Errorf("socket fds = %v, want [9 10]", fds)
	}
	// Resizing a live device freezes its queue until in-flight I/O is
	// answered; the server sending RECONFIGURE may be the one that must
	// answer it. Never send a size.
	for _, typ := range []uint16{uapiAttrSizeBytes, uapiAttrBlockSizeBytes, uapiAttrServerFlags} {
		if _, ok := m[typ]; ok {
			t.Errorf("RECONFIGURE carries attribute %d", typ)
		}
	}
	if _, err := (nlReconfigureRequest{Index: AnyDevice}).encode(); err == nil {
		t.Error("RECONFIGURE without an index encoded")
	}
}

func TestNetlinkDisconnectLayout(t *testing.T) {
	b, err := encodeNLIndex(12)
	if err != nil {
		t.Fatal(err)
	}
	// One attribute: len 8 (4 header + 4 payload), type 1, u32 12.
	want := make([]byte, 8)
	binary.NativeEndian.PutUint16(want[0:], 8)
	binary.NativeEndian.PutUint16(want[2:], uapiAttrIndex)
	binary.NativeEndian.PutUint32(want[4:], 12)
	if !bytes.Equal(b, want) {
		t.Errorf("DISCONNECT payload = % x, want % x", b, want)
	}
	if _, err := encodeNLIndex(-1); err == nil {
		t.Error("negative index encoded")
	}
}

// rawAttr builds one netlink attribute by hand: u16 length, u16 type,
// payload, padding to 4 bytes.
func rawAttr(typ uint16, payload []byte) []byte {
	n := 4 + len(payload)
	b := make([]byte, (n+3)&^3)
	binary.NativeEndian.PutUint16(b[0:], uint16(n))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], payload)
	return b
}

func u32(v uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, v)
	return b
}

func TestNetlinkDecodeConnectReply(t *testing.T) {
	reply := rawAttr(uapiAttrIndex, u32(5))
	got, err := decodeNLIndex(reply)
	if err != nil || got != 5 {
		t.Fatalf("decodeNLIndex = %d, %v; want 5", got, err)
	}
	if _, err := decodeNLIndex(rawAttr(uapiAttrSizeBytes, make([]byte, 8))); err == nil {
		t.Error("a reply without INDEX decoded")
	}
	if _, err := decodeNLIndex([]byte{0xff, 0xff, 1}); err == nil {
		t.Error("a truncated reply decoded")
	}
}

// A STATUS reply as nbd_genl_status builds it: DEVICE_LIST (nested) holding
// one DEVICE_ITEM (nested) per device with INDEX u32 and CONNECTED u8.
func TestNetlinkDecodeStatusReply(t *testing.T) {
	item := func(index uint32, connected byte) []byte {
		inner := append(rawAttr(uapiDeviceIndex, u32(index)), rawAttr(uapiDeviceConnected, []byte{connected})...)
		return rawAttr(nlaFNested|uapiDeviceItem, inner)
	}
	var list []byte
	list = append(list, item(0, 1)...)
	list = append(list, item(1, 0)...)
	list = append(list, item(16, 1)...)
	reply := rawAttr(nlaFNested|uapiAttrDeviceList, list)

	got, err := decodeNLStatus(reply)
	if err != nil {
		t.Fatal(err)
	}
	want := []nlDeviceStatus{{0, true}, {1, false}, {16, true}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("device %d: got %+v, want %+v", i, got[i], want[i])
		}
	}

	empty, err := decodeNLStatus(rawAttr(nlaFNested|uapiAttrDeviceList, nil))
	if err != nil || len(empty) != 0 {
		t.Errorf("empty device list: %v, %v", empty, err)
	}
	noIndex := rawAttr(nlaFNested|uapiAttrDeviceList,
		rawAttr(nlaFNested|uapiDeviceItem, rawAttr(uapiDeviceConnected, []byte{1})))
	if _, err := decodeNLStatus(noIndex); err == nil {
		t.Error("a device item without an index decoded")
	}
}

// Round trip through our own encoder and decoder on top of the hand-checked
// layouts above: what we send for a device list parses back the same.
func TestNetlinkStatusRoundTrip(t *testing.T) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(nlAttrDeviceList, func(list *netlink.AttributeEncoder) error {
		for i := range uint32(40) {
			list.Nested(nlDeviceItem, func(item *netlink.AttributeEncoder) error {
				item.Uint32(nlDeviceIndex, i)
				item.Uint8(nlDeviceConnected, uint8(i%3&1))
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeNLStatus(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 40 {
		t.Fatalf("%d devices, want 40", len(got))
	}
	for i, st := range got {
		if st.Index != i || st.Connected != (i%3&1 == 1) {
			t.Errorf("device %d: %+v", i, st)
		}
	}
}

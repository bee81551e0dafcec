package rafs

import "fmt"

// Names of flag bits, for tools that print them (rafsnbd inspect).

type bitName struct {
	bit  uint64
	name string
}

var extFlagNames = []bitName{
	{FlagCompressionNone, "COMPRESSION_NONE"},
	{FlagCompressionLZ4, "COMPRESSION_LZ4"},
	{FlagHashBlake3, "HASH_BLAKE3"},
	{FlagHashSHA256, "HASH_SHA256"},
	{FlagExplicitUIDGID, "EXPLICIT_UID_GID"},
	{FlagHasXattr, "HAS_XATTR"},
	{FlagCompressionGzip, "COMPRESSION_GZIP"},
	{FlagCompressionZstd, "COMPRESSION_ZSTD"},
	{FlagInlinedChunkDigest, "INLINED_CHUNK_DIGEST"},
	{FlagTarfsMode, "TARFS_MODE"},
	{FlagEncryptionNone, "ENCRYPTION_NONE"},
	{FlagEncryptionAES128, "ENCRYPTION_AES_128_XTS"},
}

var blobFeatureNames = []bitName{
	{BlobFeatureAligned, "ALIGNED"},
	{BlobFeatureInlinedFSMeta, "INLINED_FS_META"},
	{BlobFeatureChunkInfoV2, "CHUNK_INFO_V2"},
	{BlobFeatureZran, "ZRAN"},
	{BlobFeatureSeparate, "SEPARATE"},
	{BlobFeatureInlinedChunkDigest, "INLINED_CHUNK_DIGEST"},
	{BlobFeatureTarfs, "TARFS"},
	{BlobFeatureBatch, "BATCH"},
	{BlobFeatureEncrypted, "ENCRYPTED"},
	{BlobFeatureChunkdictGenerated, "IS_CHUNKDICT_GENERATED"},
	{BlobFeatureSeparatedPrefetch, "IS_SEPARATED_WITH_PREFETCH_FILES"},
	{BlobFeatureExternal, "EXTERNAL"},
	{BlobFeatureHasTarHeader, "HAS_TAR_HEADER"},
	{BlobFeatureHasTOC, "HAS_TOC"},
	{BlobFeatureCapTarTOC, "CAP_TAR_TOC"},
}

var incompatNames = []bitName{
	{0x1, "LZ4_0PADDING"},
	{0x2, "COMPR_CFGS"},
	{FeatureIncompatChunkedFile, "CHUNKED_FILE"},
	{FeatureIncompatDeviceTable, "DEVICE_TABLE"},
}

var compatNames = []bitName{
	{0x1, "SB_CHKSUM"},
	{0x2, "MTIME"},
	{FeatureCompatRafsV6, "RAFS_V6"},
}

func names(v uint64, table []bitName) []string {
	out := []string{}
	for _, b := range table {
		if v&b.bit != 0 {
			out = append(out, b.name)
			v &^= b.bit
		}
	}
	for bit := uint64(1); v != 0; bit <<= 1 {
		if v&bit != 0 {
			out = append(out, fmt.Sprintf("%#x", bit))
			v &^= bit
		}
	}
	return out
}

// ExtFlagNames names the set bits of an ext-superblock flags word
// (unknown bits as hex).
func ExtFlagNames(flags uint64) []string { return names(flags, extFlagNames) }

// BlobFeatureNames names the set bits of a blob's features.
func BlobFeatureNames(features uint32) []string { return names(uint64(features), blobFeatureNames) }

// FeatureCompatNames names the EROFS compatible feature bits.
func FeatureCompatNames(v uint32) []string { return names(uint64(v), compatNames) }

// FeatureIncompatNames names the EROFS incompatible feature bits.
func FeatureIncompatNames(v uint32) []string { return names(uint64(v), incompatNames) }

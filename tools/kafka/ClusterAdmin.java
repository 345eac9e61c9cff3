// Small admin commands for the Apache Kafka clusters that tools/kafka_cluster.py starts (tests, campaigns,
// `scripts/kafka`). Java because the broker's own client library is on the same class path and speaks every
// security setting the cluster may have (TLS, SASL/SCRAM) exactly as the broker expects.
//
//   ready CLIENT_PROPS BROKERS TIMEOUT_S          exit 0 once BROKERS brokers answer a metadata request
//   acl CLIENT_PROPS SPEC...                       allow, per SPEC "PRINCIPAL|TYPE|PATTERN|NAME|OPS", the
//                                                 principal the comma-separated OPS on a resource
//                                                 (TYPE topic|group|transactional_id|cluster,
//                                                  PATTERN literal|prefixed)
import java.io.FileInputStream;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class ClusterAdmin {
    static Admin admin(String propsPath) throws Exception {
        Properties p = new Properties();
        try (FileInputStream in = new FileInputStream(propsPath)) {
            p.load(in);
        }
        p.putIfAbsent(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        p.putIfAbsent(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        return Admin.create(p);
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: ready PROPS BROKERS TIMEOUT_S | acl PROPS PRINCIPAL|TYPE|PATTERN|NAME|OPS...");
            System.exit(2);
        }
        switch (args[0]) {
            case "ready" -> System.exit(ready(args[1], Integer.parseInt(args[2]), Double.parseDouble(args[3])));
            case "acl" -> System.exit(acl(args[1], java.util.Arrays.copyOfRange(args, 2, args.length)));
            default -> {
                System.err.println("unknown command " + args[0]);
                System.exit(2);
            }
        }
    }

    static int ready(String props, int brokers, double timeoutS) throws Exception {
        long deadline = System.nanoTime() + (long) (timeoutS * 1e9);
        String last = "no answer";
        try (Admin a = admin(props)) {
            while (System.nanoTime() < deadline) {
                try {
                    int n = a.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
                    if (n >= brokers) {
                        return 0;
                    }
                    last = n + " of " + brokers + " brokers registered";
                } catch (Exception e) {
                    last = String.valueOf(e.getCause() != null ? e.getCause() : e);
                }
                Thread.sleep(200);
            }
        }
        System.err.println("cluster not ready within " + timeoutS + " s: " + last);
        return 1;
    }

    static int acl(String props, String[] specs) throws Exception {
        List<AclBinding> bindings = new ArrayList<>();
        for (String spec : specs) {
            String[] f = spec.split("\\|");
            if (f.length != 5) {
                System.err.println("an ACL is PRINCIPAL|TYPE|PATTERN|NAME|OPS, not " + spec);
                return 2;
            }
            ResourceType rt = ResourceType.fromString(f[1].toUpperCase());
            PatternType pt = PatternType.fromString(f[2].toUpperCase());
            if (rt == ResourceType.UNKNOWN || pt == PatternType.UNKNOWN) {
                System.err.println("unknown resource type or pattern: " + f[1] + " " + f[2]);
                return 2;
            }
            for (String op : f[4].split(",")) {
                AclOperation o = AclOperation.fromString(op.trim().toUpperCase());
                if (o == AclOperation.UNKNOWN) {
                    System.err.println("unknown operation " + op);
                    return 2;
                }
                bindings.add(new AclBinding(new ResourcePattern(rt, f[3], pt),
                        new AccessControlEntry(f[0], "*", o, AclPermissionType.ALLOW)));
            }
        }
        try (Admin a = admin(props)) {
            a.createAcls(bindings).all().get(30, TimeUnit.SECONDS);
        }
        return 0;
    }
}
